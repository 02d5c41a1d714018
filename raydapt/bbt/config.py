"""The typed config of black-box prompt search jobs (BBT, BBTv2; GDFO extends it)."""
from __future__ import annotations

from dataclasses import dataclass

from raydapt.config import check, check_directory, check_positive, field

__all__ = ["TaskConfig", "BBTConfig", "QUICK", "RESULT_NEUTRAL_FIELDS"]

# Fields that change where and how fast a run executes, never its numbers: a resumed run may
# change them (e.g. resume a 1x1 run on 2 replicas x 2 stages). tests/test_bbt_job.py changes every
# one of them between a killed run and its resume and gets the same bytes. Not gpus_per_stage: it
# moves the stages to CUDA, whose float results are not CPU's.
RESULT_NEUTRAL_FIELDS = ("resume", "output_dir", "replicas", "stages", "cpus_per_stage",
                         "local", "log_every", "placement", "fault_injection")


@dataclass
class TaskConfig:
    """The few-shot task and the model it is posed to: fields every prompt-tuning job shares."""
    seed: int = field(42, "master seed: few-shot sample, projection A, optimizer")
    model: str = field("", "checkpoint dir of the black-box LM (default: the built large LM)")
    task: str = field("", "task file (.csv/.jsonl/.parquet with text and label columns); default: the "
                      "built-in task")
    test_file: str = field("", "test file for --task (default: the task file's examples not sampled)")
    template: str = field("{text}", "template for --task; {text} is replaced by the input")
    verbalizer: str = field("", "comma-separated label words for --task, one single token each, one per class "
                            "in label order: integer labels 0, 1, ...; string labels sorted (neg, pos)")
    text_column: str = field("text", "text column of --task")
    label_column: str = field("label", "label column of --task")
    k_shot: int = field(16, "train examples per class (and as many more for dev)")
    placeholder: str = field("\n", "the one token whose embedding fills the L prompt slots (BBT's p0)")

    def __post_init__(self):
        check(self.k_shot >= 1, "k_shot", f"must be >= 1, got {self.k_shot}")
        check_directory(self.model, "model", "the built large LM")
        # The built-in task brings its own template and label words: these flags only pose --task.
        check(bool(self.task) or not self.test_file, "test_file", "needs --task")
        check(bool(self.task) or self.template == "{text}", "template",
              "needs --task (the built-in task has its own template)")
        check(bool(self.task) or not self.verbalizer, "verbalizer",
              "needs --task (the built-in task has its own label words)")
        check(not self.task or bool(self.verbalizer), "verbalizer", "is required with --task")
        check(self.template.count("{text}") == 1, "template",
              f"must contain {{text}} exactly once, got {self.template!r}")
        words = self.label_words()
        check(all(words), "verbalizer", f"has an empty word in {self.verbalizer!r} (comma-separated, one per class)")
        check(len(set(words)) == len(words), "verbalizer", f"repeats a word in {self.verbalizer!r}")
        check(not words or len(words) >= 2, "verbalizer", f"needs a word for each of at least 2 classes, "
              f"got {self.verbalizer!r}")

    def label_words(self) -> list[str]:
        """--verbalizer split at commas (spaces kept: ' good' is another token than 'good'); [] when unset."""
        return self.verbalizer.split(",") if self.verbalizer else []


@dataclass
class BBTConfig(TaskConfig):
    """Black-box tuning of a continuous prompt: CMA-ES / nevergrad in a random subspace (BBT, BBTv2)."""
    method: str = field("bbt", "bbt: one prompt at the input; bbtv2: a prompt at every layer, "
                        "searched layer by layer", choices=("bbt", "bbtv2"))
    optimizer: str = field("cma", "cma (pycma), lq-cma (pycma's CMA-ES with its linear-quadratic surrogate "
                           "choosing which candidates the LM scores) or any nevergrad optimizer name (CMA, NGOpt, "
                           "TwoPointsDE, OnePlusOne, ...)")
    budget: int = field(2000, "API calls for the search; one call = one candidate on the whole train set "
                        "(the paper: 8000, see configs/paper.yaml)")
    popsize: int = field(20, "candidates per generation")
    intrinsic_dim: int = field(100, "d: dimension of the searched z (prompt = A z + p0); the paper: 500")
    prompt_length: int = field(10, "L: prompt tokens; the paper: 50")
    sigma: float = field(1.0, "initial step size of the search (z starts at 0)")
    bound: float = field(0.0, "box z in [-bound, bound] (pycma's optimizers); 0: no bounds, as the reference "
                         "deepbbt.py's --bound default (its first release used 5 with sigma 0.5)")
    alpha: float = field(1.0, "scale of A: std = alpha * std(embeddings) / (sqrt(d) * sigma)")
    projection: str = field("normal", "distribution of A", choices=("normal", "uniform"))
    mode: str = field("add", "add: A z is added to L placeholder embeddings (p0); cat: A z is inserted "
                      "before the text (p0 = 0)", choices=("add", "cat"))
    loss: str = field("ce", "search objective on the label-word logits", choices=("ce", "hinge"))
    dev_every: int = field(100, "score the best prompt on dev every this many API calls")
    replicas: int = field(1, "oracle pipeline replicas")
    stages: int = field(1, "pipeline stages per replica")
    cpus_per_stage: float = field(1.0, "CPUs per stage actor")
    gpus_per_stage: float = field(0.0, "GPUs per stage actor")
    placement: str = field("PACK", "placement group strategy of a replica's stages",
                           choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    micro_batch: int = field(32, "rows per micro-batch (fixed: results do not depend on replicas/stages)")
    prefix_sharing: bool = field(True, "run the prompt prefix once per candidate in each stage, not once per "
                                 "example (equal within float rounding; false: every row runs it)")
    local: bool = field(False, "serve the model in this process instead of Ray actors")
    fault_injection: str = field("", "kill-stage:after-calls=N[,stage=S][,replica=R]: kill a stage actor "
                                 "mid-run to check that the run survives it with the same result")
    output_dir: str = field("runs/bbt", "where result.json, the prompt, the log and the checkpoint go")
    resume: bool = field(False, "continue the run in --output-dir from its last checkpoint")
    log_every: int = field(25, "print a summary line above the progress bar every this many generations")

    def __post_init__(self):
        super().__post_init__()
        check(self.popsize >= 2, "popsize", f"must be >= 2, got {self.popsize}")
        check(self.intrinsic_dim >= 1, "intrinsic_dim", f"must be >= 1, got {self.intrinsic_dim}")
        check(self.prompt_length >= 1, "prompt_length", f"must be >= 1, got {self.prompt_length}")
        check(self.budget >= self.popsize, "budget",
              f"{self.budget} is smaller than one population (--popsize {self.popsize})")
        check_positive(self.sigma, "sigma")
        check_positive(self.alpha, "alpha")
        check(self.bound >= 0, "bound", f"must be >= 0, got {self.bound}")
        check(self.bound == 0 or self.optimizer in ("cma", "lq-cma"), "bound",
              f"needs --optimizer cma or lq-cma, got {self.optimizer!r}")
        check(self.dev_every >= 1, "dev_every", f"must be >= 1, got {self.dev_every}")
        check(self.replicas >= 1, "replicas", f"must be >= 1, got {self.replicas}")
        check(self.stages >= 1, "stages", f"must be >= 1, got {self.stages}")
        check(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")
        check_positive(self.cpus_per_stage, "cpus_per_stage")
        check_positive(self.gpus_per_stage, "gpus_per_stage", strict=False)
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.seed != 0, "seed", "must be non-zero (pycma reads 0 as 'seed from the clock')")


# A small preset that finishes in under 3 minutes on 2 cores, Ray start-up included.
QUICK = {"budget": 600, "popsize": 10, "intrinsic_dim": 50, "prompt_length": 5, "k_shot": 8,
         "dev_every": 50}
