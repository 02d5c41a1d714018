"""The typed config of a recursive-LM run: one pass, textual recursion or neural recursion."""
from __future__ import annotations

from dataclasses import dataclass

from raydapt.config import check, check_directory, check_positive, field

__all__ = ["METHODS", "RecursiveConfig", "QUICK", "RESULT_NEUTRAL_FIELDS"]

METHODS = ("one_pass", "textual", "neural", "neural_no_pretrain")

# Where and how a run executes, never its numbers (tests/test_recursive.py changes them on resume).
RESULT_NEUTRAL_FIELDS = ("resume", "output_dir", "replicas", "stages", "cpus_per_stage", "local", "log_every",
                         "fault_injection", "recompute")


@dataclass
class RecursiveConfig:
    """A recursive LM (Levine et al., 2022) on one generation task of the multi-task set: pass 1 is
    the frozen large LM behind a learned soft prompt; pass 2 is the same frozen LM again, reading the
    input plus pass 1's sampled answers (textual) or pass 1's final states through a learned
    connector (neural). Every method trains pass 1 first, as --method one_pass does, with the same
    seed, so pass 2's gain over one pass is paired."""
    method: str = field("neural", "one_pass: the prompt-tuned LM alone; textual: pass 2 reads k sampled answers; "
                        "neural: a connector maps pass 1's final states to pass 2's input, pre-trained on "
                        "language modelling first; neural_no_pretrain: the same without pre-training",
                        choices=METHODS)
    seed: int = field(42, "seed of the modules' initialisation, the batch order and the sampling")
    model: str = field("", "checkpoint dir of the frozen large LM (default: the built large LM)")
    tasks_dir: str = field("", "multi-task directory (tasks.json, train/dev/test.jsonl; default: the built-in one)")
    task: str = field("closing_brackets", "the generation task (one prompt-tuned pass gets about a third of it right)")
    prompt_length: int = field(8, "n_p: soft-prompt vectors in front of each pass")
    steps: int = field(300, "Adam steps of pass 1's prompt (one_pass: --steps + --second-steps, the task steps a "
                       "recursion takes in all)")
    second_steps: int = field(300, "Adam steps of pass 2 (its prompt, and the connector when neural)")
    pretrain_steps: int = field(300, "Adam steps of the connector's language-model pre-training (neural)")
    batch: int = field(32, "task rows per step")
    pretrain_batch: int = field(32, "text chunks per pre-training step")
    lr: float = field(0.003, "Adam learning rate of every phase")
    samples: int = field(4, "k: answers pass 1 samples per input (textual)")
    temperature: float = field(0.5, "pass 1's sampling temperature (textual; at 1.0 a quick run's k = 4 samples held "
                                "the answer less often than its greedy answer did)")
    max_new_tokens: int = field(4, "longest sampled answer, the end token included (textual)")
    states: int = field(8, "m: pass 1's last final states the connector maps to pass 2's input (neural)")
    connector_width: int = field(512, "the connector MLP's hidden width (neural)")
    pretrain_context: int = field(32, "pre-training: tokens pass 1 reads before the connector")
    pretrain_continuation: int = field(32, "pre-training: tokens pass 2 predicts after the connector's vectors")
    eval_every: int = field(50, "score dev every this many steps of a phase (and checkpoint)")
    micro_batch: int = field(8, "rows per micro-batch (fixed: results do not depend on replicas/stages)")
    recompute: bool = field(False, "stages keep no activations between forward and backward (rebuild them)")
    replicas: int = field(1, "pipeline replicas of the frozen LM")
    stages: int = field(1, "pipeline stages per replica")
    cpus_per_stage: float = field(1.0, "CPUs per stage actor")
    local: bool = field(False, "serve the model in this process instead of Ray actors")
    fault_injection: str = field("", "kill-stage:after-calls=N[,stage=S][,replica=R]: kill a stage actor "
                                 "mid-run to check that the run survives it with the same result")
    output_dir: str = field("runs/recursive", "where result.json, the modules, the log and the checkpoint go")
    resume: bool = field(False, "continue the run in --output-dir from its last checkpoint")
    log_every: int = field(25, "print a summary line above the progress bar every this many steps")

    def __post_init__(self):
        check_directory(self.model, "model", "the built large LM")
        for name in ("prompt_length", "steps", "second_steps", "pretrain_steps", "batch", "pretrain_batch", "samples",
                     "max_new_tokens", "states", "connector_width", "pretrain_context", "pretrain_continuation",
                     "eval_every", "micro_batch", "replicas", "stages", "log_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check_positive(self.lr, "lr")
        check_positive(self.temperature, "temperature")
        check_positive(self.cpus_per_stage, "cpus_per_stage")

    def phases(self) -> list[tuple[str, int]]:
        """(phase, steps) in the order they run; a run's global step counts through all of them."""
        # One pass gets as many task steps as a recursion's two passes take together.
        out = [("first", self.steps + (self.second_steps if self.method == "one_pass" else 0))]
        if self.method == "neural":
            out.append(("pretrain", self.pretrain_steps))
        if self.method != "one_pass":
            out.append(("second", self.second_steps))
        return out


# Under 3 minutes on 2 cores, Ray start-up included.
QUICK = {"steps": 40, "second_steps": 40, "pretrain_steps": 40, "batch": 16, "pretrain_batch": 16, "eval_every": 20,
         "prompt_length": 4}
