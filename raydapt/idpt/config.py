"""The typed config of input-dependent prompt tuning (and its static-prompt baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from raydapt.config import check, check_directory, check_positive, field

__all__ = ["IDPTConfig", "QUICK", "RESULT_NEUTRAL_FIELDS"]

# Where and how a run executes, never its numbers (tests/test_idpt.py changes them on resume).
# --recompute rebuilds each stage's graph from its input: the same operations, the same bits.
RESULT_NEUTRAL_FIELDS = ("resume", "output_dir", "replicas", "stages", "cpus_per_stage", "local", "log_every",
                         "fault_injection", "recompute")


@dataclass
class IDPTConfig:
    """Input-dependent prompt tuning (ID-PT) of the frozen large LM through the gray-box pipeline,
    or (--method static) one static prompt of the same length, on a mix of tasks."""
    method: str = field("idpt", "idpt: a prompt generator reads each input; static: one learned prompt",
                        choices=("idpt", "static"))
    seed: int = field(42, "seed of the modules' initialisation and the batch order")
    model: str = field("", "checkpoint dir of the frozen large LM (default: the built large LM)")
    generator: str = field("", "checkpoint dir of the generator's frozen small LM, same tokenizer as --model "
                           "(default: the built small LM)")
    tasks_dir: str = field("", "multi-task directory (tasks.json, train/dev/test.jsonl; default: the built-in one)")
    tasks: str = field("", "comma-separated task names to mix (default: every task of --tasks-dir)")
    prompt_length: int = field(8, "n_p: prompt vectors prepended to the large LM's input")
    soft_length: int = field(4, "the generator's own soft prompt, in front of its input")
    steps: int = field(300, "Adam steps")
    batch: int = field(32, "training rows per step, drawn from every task's train split")
    lr: float = field(0.003, "Adam learning rate")
    eval_every: int = field(50, "score dev every this many steps (and checkpoint)")
    micro_batch: int = field(8, "rows per micro-batch (fixed: results do not depend on replicas/stages)")
    recompute: bool = field(False, "stages keep no activations between forward and backward (rebuild them)")
    replicas: int = field(1, "pipeline replicas of the frozen LM")
    stages: int = field(1, "pipeline stages per replica")
    cpus_per_stage: float = field(1.0, "CPUs per stage actor")
    local: bool = field(False, "serve the model in this process instead of Ray actors")
    fault_injection: str = field("", "kill-stage:after-calls=N[,stage=S][,replica=R]: kill a stage actor "
                                 "mid-run to check that the run survives it with the same result")
    output_dir: str = field("runs/idpt", "where result.json, the modules, the log and the checkpoint go")
    resume: bool = field(False, "continue the run in --output-dir from its last checkpoint")
    log_every: int = field(25, "print a summary line above the progress bar every this many steps")

    def __post_init__(self):
        check_directory(self.model, "model", "the built large LM")
        check_directory(self.generator, "generator", "the built small LM")
        for name in ("prompt_length", "soft_length", "steps", "batch", "eval_every", "micro_batch", "replicas",
                     "stages", "log_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check_positive(self.lr, "lr")
        check_positive(self.cpus_per_stage, "cpus_per_stage")

    def task_names(self) -> list[str]:
        return [t for t in self.tasks.split(",") if t] if self.tasks else []


# Under 3 minutes on 2 cores, Ray start-up included.
QUICK = {"steps": 30, "batch": 16, "eval_every": 15, "prompt_length": 4}
