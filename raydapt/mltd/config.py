"""The typed config of an MLtD run: which method, the TARP/TAMS sizes, the meta-learning loop and the
meta-test adaptation shared by every method."""
from __future__ import annotations

from dataclasses import dataclass

from raydapt.adapters.tams import TAMSConfig
from raydapt.adapters.tarp import KINDS, TARPConfig
from raydapt.config import check, check_directory, check_positive, field
from raydapt.defaults import default_model_dir

__all__ = ["MLtDConfig", "METHODS", "META_METHODS", "QUICK", "RESULT_NEUTRAL_FIELDS"]

METHODS = {
    "zero-shot": "the backbone as it is, no adaptation",
    "full": "full fine-tuning of every backbone weight on each held-out domain",
    "lora": "LoRA (peft) on every attention and FFN linear, rank --lora-rank, fitted on each held-out domain",
    "tarp": "TARP fitted on each held-out domain, no meta-learning",
    "multitask": "control: backbone + TARP trained on the pooled meta-train domains (same steps, no inner loop), "
                 "then TARP fitted on each held-out domain",
    "tarp-meta": "TARP with first-order MAML over the meta-train domains, then fitted on each held-out domain",
    "tams-meta": "TARP + TAMS with first-order MAML, then fitted on each held-out domain (the controller picks its cell)",
}
META_METHODS = ("multitask", "tarp-meta", "tams-meta")  # meta-trained on Ray Train first
RESULT_NEUTRAL_FIELDS = ("resume", "output_dir", "fault_injection", "storage_path")


@dataclass
class MLtDConfig:
    """Meta-learning the difference (Hou, Salazar, Polovets, TACL 2022) on the frozen large LM: TARP,
    TAMS and first-order MAML on Ray Train over meta-train domains (stdlib packages and languages),
    scored by test perplexity on held-out domains after a short adaptation on each one's train split."""
    method: str = field("tarp-meta", "what is run: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()),
                        choices=tuple(METHODS))
    seed: int = field(1, "seed of every initialisation, task sample and batch")
    model: str = field("", "checkpoint dir of the LM (default: the built large LM)")
    tarp: str = field("dynamic", "TARP form: " + "; ".join(f"{k}: {v}" for k, v in KINDS.items()), choices=tuple(KINDS))
    rank: int = field(4, "TARP rank r (the paper: 4 to 32); at most the narrowest layer's width")
    lora_rank: int = field(8, "LoRA rank of the lora baseline")
    tams_ops: str = field("zero,identity,linear,glu,conv3,conv5", "TAMS candidate operations per edge")
    tams_width: int = field(16, "channels of the TAMS cell")
    context: int = field(64, "tokens per sequence")
    train_sequences: int = field(200, "training sequences of each held-out domain (the paper's low-resource: 50-500)")
    meta_train_sequences: int = field(200, "training sequences of each meta-train domain")
    test_sequences: int = field(32, "test sequences of every domain")
    meta_test_domains: str = field("", "comma-separated held-out domains to score (default: every held-out domain)")
    domains_dir: str = field("", "a directory of user domains, one file or subdirectory each (default: the recipe "
                             "raydapt.data.make_domains: stdlib packages and gettext languages)")
    meta_steps: int = field(60, "outer (meta) steps")
    meta_batch: int = field(4, "tasks per meta-step, spread over the workers (>= --workers)")
    inner_steps: int = field(4, "inner-loop Adam steps on a task's train split (TARP/TAMS only)")
    inner_batch: int = field(4, "sequences per inner step, per outer step and per adaptation step")
    inner_lr: float = field(0.003, "Adam rate of the inner loop and of the meta-test adaptation (TARP, TAMS, LoRA)")
    outer_lr: float = field(0.001, "Adam rate of the outer loop for TARP's initialisation, TAMS and the controller")
    base_lr: float = field(0.0001, "Adam rate of the outer loop for the backbone (0: the backbone stays frozen)")
    adapt_steps: int = field(20, "adaptation steps on each held-out domain's train split")
    full_lr: float = field(0.0003, "Adam rate of full fine-tuning's adaptation (every backbone weight)")
    checkpoint_every: int = field(20, "Ray Train checkpoint every this many meta-steps")
    workers: int = field(2, "Ray Train workers; the tasks of a meta-batch are spread over them")
    cpus_per_worker: float = field(1.0, "CPUs per Ray Train worker (its torch threads)")
    storage_path: str = field("", "Ray Train storage (default: <output-dir>/train)")
    fault_injection: str = field("", "kill-worker:after-steps=N: the last worker dies once at meta-step N")
    output_dir: str = field("runs/mltd", "where result.json, log.jsonl, mltd.safetensors and the plot go")
    resume: bool = field(False, "continue the run in --output-dir from its last Ray Train checkpoint")

    def __post_init__(self):
        check_directory(self.model, "model", "the built large LM")
        check(not self.domains_dir or __import__("pathlib").Path(self.domains_dir).is_dir(), "domains_dir",
              f"{self.domains_dir} is not a directory")
        self.tarp_config()
        self.tams_config()
        for name in ("lora_rank", "tams_width", "context", "train_sequences", "meta_train_sequences",
                     "test_sequences", "meta_steps", "meta_batch", "inner_steps", "inner_batch", "checkpoint_every",
                     "workers"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.adapt_steps >= 0, "adapt_steps", f"must be >= 0, got {self.adapt_steps}")
        check(self.meta_batch >= self.workers, "meta_batch",
              f"{self.meta_batch} tasks cannot be spread over --workers {self.workers}; accepted: >= {self.workers}")
        for name in ("inner_lr", "outer_lr", "full_lr", "cpus_per_worker"):
            check_positive(getattr(self, name), name)
        check_positive(self.base_lr, "base_lr", strict=False)

    def tarp_config(self) -> TARPConfig:
        return TARPConfig(kind=self.tarp, rank=self.rank)

    def tams_config(self) -> TAMSConfig:
        return TAMSConfig(ops=self.tams_ops, width=self.tams_width)

    @property
    def domains(self) -> list[str]:
        return [d.strip() for d in self.meta_test_domains.split(",") if d.strip()]


# Under 3 minutes on 2 cores, Ray start-up included: the default small LM (2 layers, width 32; TARP on
# the large LM's 28 linears costs ~1 s per step on one core), short splits, few meta-steps.
QUICK = {"model": str(default_model_dir("small")), "meta_steps": 40, "meta_batch": 4, "inner_steps": 2,
         "adapt_steps": 16, "train_sequences": 64, "meta_train_sequences": 48, "test_sequences": 16, "context": 64,
         "checkpoint_every": 20}
