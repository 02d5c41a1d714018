"""CombLM's typed config (flags, YAML) and its quick preset."""
from __future__ import annotations

import math
from dataclasses import dataclass

from raydapt.config import check, check_directory, check_positive, field
from raydapt.serving import parse_fault_spec

__all__ = ["CombLMConfig", "QUICK", "RESULT_NEUTRAL_FIELDS", "parse_fault"]

ALL_COMBINERS = "mean,constant_scalar,constant_vector,entropy_scalar,entropy_vector,full_scalar,full_vector"


@dataclass
class CombLMConfig:
    """Fine-tune a small expert with Ray Train and learn how to mix it with the black-box large LM."""
    model: str = field("", "black-box large LM checkpoint directory (default: the built large LM)")
    expert: str = field("", "small LM to fine-tune into the expert; must share the large LM's tokenizer "
                            "(default: the built small LM)")
    target: str = field("", "target-domain text: a directory of .txt/.md/.rst/.py files, a .txt file, or a "
                            ".jsonl/.csv/.parquet file with a text column (default: the Python docs' "
                            "topic pages, pydoc_data, which the default models never saw)")
    general: str = field("", "general-domain text, same formats (default: held-out stdlib source files)")
    output_dir: str = field("runs/comblm", "where config.json, data/, expert/, cache/, combiners/, "
                                           "result.json and perplexity.png go")
    resume: bool = field(False, "continue a run in --output-dir: finished phases are kept, expert "
                                "fine-tuning resumes from its last Ray Train checkpoint")
    seed: int = field(0, "seed of the data split, expert fine-tuning and combiner fitting")
    block: int = field(128, "tokens per sequence (at most both models' context)")
    train_tokens: int = field(0, "cap on target tokens the expert trains on (0: the whole split)")
    fit_tokens: int = field(0, "cap on the combiners' fit-set tokens (0: the whole split)")
    test_tokens: int = field(32768, "cap on target and general test tokens each (0: the whole split)")
    fit_mix: float = field(0.0, "fraction of the fit set drawn from the general domain (0.5: the paper's "
                                "50/50 mix against forgetting)")
    workers: int = field(2, "Ray Train data-parallel workers fine-tuning the expert")
    cpus_per_worker: float = field(1.0, "CPUs per Ray Train worker")
    use_gpu: bool = field(False, "one GPU per Ray Train worker")
    expert_steps: int = field(400, "optimizer steps of expert fine-tuning")
    expert_batch: int = field(16, "sequences per step, over all workers (divisible by --workers)")
    expert_lr: float = field(2e-3, "AdamW learning rate of the expert (linear warm-up, cosine decay)")
    checkpoint_every: int = field(50, "expert steps between Ray Train checkpoints")
    storage_path: str = field("", "Ray Train storage (a path every node sees, or s3:// gs:// "
                                  "URI; default: OUTPUT_DIR/train)")
    combiners: str = field(ALL_COMBINERS, "comma-separated combiners to fit and report")
    control: str = field("mean,constant_scalar,entropy_scalar",
                         "combiners also fitted with the UN-fine-tuned small LM (the paper's control)")
    hidden: int = field(512, "width of the entropy/full combiners' ReLU layers")
    layers: int = field(2, "ReLU layers of the entropy/full combiners")
    combiner_batch: int = field(1024, "tokens per combiner Adam step (the paper's 1024)")
    combiner_workers: int = field(2, "Ray Train workers fitting the combiners; they split the combiners, "
                                     "so results do not depend on it")
    combiner_epochs: int = field(10, "passes over the fit set (the paper: one pass over a far larger set; "
                                     "ten here give a comparable number of Adam steps)")
    proxy_alpha: float = field(1.0, "proxy-tuning's alpha: large + alpha * (expert - untuned small)")
    max_cache_gb: float = field(4.0, "refuse to start if the cached full distributions (float16) would "
                                     "exceed this many GB")
    stages: int = field(1, "pipeline stages per large-LM replica")
    replicas: int = field(1, "large-LM replicas scoring in parallel")
    cpus_per_stage: float = field(1.0, "CPUs per stage actor")
    gpus_per_stage: float = field(0.0, "GPUs per stage actor")
    micro_batch: int = field(8, "sequences per oracle micro-batch")
    fault_injection: str = field("", "kill-worker:after-steps=N kills one Ray Train worker once, at step N")

    def __post_init__(self):
        check_directory(self.model, "model", "the built large LM")
        check_directory(self.expert, "expert", "the built small LM")
        for name in ("block", "workers", "expert_steps", "expert_batch", "checkpoint_every", "hidden", "combiner_workers",
                     "layers", "combiner_batch", "combiner_epochs", "stages", "replicas", "micro_batch"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        check(self.block >= 8, "block", f"must be at least 8, got {self.block}")
        check(self.combiner_batch >= 2, "combiner_batch", "must be at least 2 (BatchNorm needs 2 rows)")
        for name in ("train_tokens", "fit_tokens", "test_tokens"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(0.0 <= self.fit_mix < 1.0, "fit_mix", f"must be in [0, 1), got {self.fit_mix}")
        check(self.expert_batch % self.workers == 0, "expert_batch",
              f"{self.expert_batch} sequences do not split evenly over {self.workers} workers")
        for name in ("expert_lr", "max_cache_gb", "cpus_per_worker", "cpus_per_stage"):
            check_positive(getattr(self, name), name)
        check_positive(self.gpus_per_stage, "gpus_per_stage", strict=False)
        check(math.isfinite(self.proxy_alpha), "proxy_alpha", f"must be a finite number, got {self.proxy_alpha}")
        from raydapt.comblm.combiners import COMBINERS
        for name in ("combiners", "control"):
            for kind in self.kinds(name):
                check(kind in COMBINERS, name, f"unknown combiner {kind!r}; accepted: {', '.join(COMBINERS)}")
        check(bool(self.kinds("combiners")), "combiners", "needs at least one combiner")
        parse_fault(self.fault_injection)

    def kinds(self, name: str = "combiners") -> list[str]:
        """The combiner names listed in field `name` ("combiners" or "control")."""
        return [k.strip() for k in getattr(self, name).split(",") if k.strip()]


def parse_fault(spec: str) -> int | None:
    """`kill-worker:after-steps=N` -> N (None when empty)."""
    fields = parse_fault_spec(spec, "kill-worker", ("after-steps",))
    return fields["after-steps"] if fields else None


# Under 5 minutes on 2 cores including Ray start-up: the same code, smaller splits and fewer steps.
QUICK = dict(train_tokens=60_000, fit_tokens=12_000, test_tokens=8_000, expert_steps=150, checkpoint_every=50,
             hidden=128)

# Changing these does not change any result, so --resume accepts them: tests/test_comblm.py kills a
# run mid-phase, resumes it with each changed and compares bytes with an uninterrupted run. Not
# cpus_per_worker (the expert's thread count can change float sums), gpus_per_stage (another
# device), output_dir or storage_path (Ray Train's checkpoints live there).
RESULT_NEUTRAL_FIELDS = ("resume", "stages", "replicas", "cpus_per_stage", "micro_batch", "fault_injection",
                         "combiner_workers")
