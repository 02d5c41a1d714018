"""The typed config of extending the frozen LM to a new language (neutral residues and baselines)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from raydapt.adapters.config import METHODS, AdapterConfig
from raydapt.config import check, check_directory, check_positive, field
from raydapt.data.make_newlang import DEFAULT_LOCALE_DIR

__all__ = ["ExtendConfig", "QUICK", "RESULT_NEUTRAL_FIELDS"]

# Where and how a run executes, never its numbers: --resume accepts a change of these.
RESULT_NEUTRAL_FIELDS = ("resume", "output_dir", "fault_injection", "storage_path")


@dataclass
class ExtendConfig:
    """Extend the frozen large LM to a new language (default: French from the OS's gettext catalogs)
    with neutral residues (Signe Talla, Grave, Jegou, ICML 2025) or a baseline, trained with Ray Train;
    scored on learning (new-language loss) and forgetting (loss on an original-domain source that is
    not the one mixed into training)."""
    method: str = field("neutral", "what is trained: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()),
                        choices=tuple(METHODS))
    seed: int = field(42, "seed of the adapter's initialisation and of the batch order")
    model: str = field("", "checkpoint dir of the frozen LM to extend (default: the built large LM)")
    extra_params: float = field(0.2, "adapter (or LoRA) parameters as a fraction of the backbone's, in (0, 1]")
    alpha: float = field(0.01, "weight of the l1 term on original-domain tokens (BCE for neutral-sigmoid), >= 0")
    lr: float = field(0.002, "AdamW learning rate (linear warm-up over 5% of the steps, then cosine)")
    steps: int = field(300, "optimizer steps")
    batch: int = field(16, "blocks per step, over all workers (a multiple of --workers)")
    context: int = field(128, "tokens per block")
    original_fraction: float = field(0.1, "p: the share of original-domain blocks in the training mix, in [0, 1)")
    eval_blocks: int = field(64, "blocks per evaluation set (new-language dev and test, original mix, original eval)")
    checkpoint_every: int = field(50, "Ray Train checkpoint every this many steps")
    new_domain: str = field("", "new-language corpus: a directory or a text/jsonl/parquet file "
                            "(default: the gettext catalogs of --language under --locale-dir)")
    language: str = field("fr", "language of the gettext catalogs used when --new-domain is not given")
    locale_dir: str = field(DEFAULT_LOCALE_DIR, "where the gettext catalogs are (<dir>/<language>/LC_MESSAGES/*.mo)")
    original_mix: str = field("", "original-domain text mixed into training (default: the held-out stdlib files)")
    original_eval: str = field("", "original-domain text that measures forgetting, not mixed in "
                               "(default: the source of installed third-party packages yaml, tqdm, cma)")
    sweep_methods: str = field("", "sweep mode: comma-separated methods, one run each (x --sweep-lrs) in "
                               "<output-dir>/<method>-lr<lr>/, then sweep.json and tradeoff.png (learning vs forgetting)")
    sweep_lrs: str = field("", "sweep mode: comma-separated learning rates (default: --lr)")
    workers: int = field(2, "Ray Train data-parallel workers")
    cpus_per_worker: float = field(1.0, "CPUs per Ray Train worker (its torch threads)")
    use_gpu: bool = field(False, "one GPU per Ray Train worker")
    storage_path: str = field("", "Ray Train storage (default: <output-dir>/train; a bucket URI on a cluster)")
    fault_injection: str = field("", "kill-worker:after-steps=N: the last worker dies once at step N (the run "
                                 "must end with the numbers of an undisturbed one)")
    output_dir: str = field("runs/extend", "where result.json, log.jsonl, adapters.safetensors and the plot go")
    resume: bool = field(False, "continue the run in --output-dir from its last Ray Train checkpoint")

    def __post_init__(self):
        check_directory(self.model, "model", "the built large LM")
        for name in ("new_domain", "original_mix", "original_eval"):  # cheap here; empty corpora fail on reading
            path = getattr(self, name)
            check(not path or Path(path).exists(), name, f"{path} does not exist")
        self.adapter()  # --extra-params in (0, 1], --alpha >= 0
        for name in ("steps", "batch", "context", "eval_blocks", "checkpoint_every", "workers"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.batch % self.workers == 0, "batch", f"{self.batch} is not a multiple of --workers {self.workers}")
        check_positive(self.lr, "lr")
        check_positive(self.cpus_per_worker, "cpus_per_worker")
        if self.is_sweep:
            from raydapt.extend.sweep import sweep_grid
            sweep_grid(self)  # the lists parse and name known methods
        check(math.isfinite(self.original_fraction) and 0 <= self.original_fraction < 1, "original_fraction",
              f"must be in [0, 1), got {self.original_fraction}")

    @property
    def is_sweep(self) -> bool:
        return bool(self.sweep_methods or self.sweep_lrs)

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(method=self.method, extra_params=self.extra_params, alpha=self.alpha)


# Under 3 minutes on 2 cores, Ray start-up included.
QUICK = {"steps": 40, "batch": 8, "context": 64, "eval_blocks": 16, "checkpoint_every": 20}
