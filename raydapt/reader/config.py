"""The typed config of the frozen reader job (Levine et al., 2022)."""
from __future__ import annotations

from dataclasses import dataclass

from raydapt.config import check, check_directory, check_positive, field

__all__ = ["ReaderConfig", "QUICK", "RESULT_NEUTRAL_FIELDS", "MODES"]

# Where and how a run executes, never its numbers.
RESULT_NEUTRAL_FIELDS = ("resume", "output_dir", "replicas", "stages", "cpus_per_stage", "local", "log_every",
                         "fault_injection", "recompute", "index_dir")
MODES = ("closed_book", "retriever", "reranker", "white_box")


@dataclass
class ReaderConfig:
    """A soft prompt for the frozen large LM reading packed passages (or none: closed book), tuned
    through the gray-box pipeline on the open-book task."""
    mode: str = field("retriever", "closed_book: the question alone; retriever: BM25's top passages packed in "
                      "retrieval order; reranker: the same passages re-ordered by a trained cross-encoder; white_box: the "
                      "reference, the small LM fine-tuned as the reader on the reranker's packed rows", choices=MODES)
    seed: int = field(42, "seed of the prompt's initialisation and the batch order")
    model: str = field("", "checkpoint dir of the frozen large LM (default: the built large LM)")
    task_dir: str = field("", "open-book task directory (task.json, train/dev/test.jsonl; default: the built-in one)")
    corpus: str = field("", "corpus.jsonl of passages (default: the task directory's)")
    index_dir: str = field("", "saved BM25 index of --corpus, built there when absent (default: one per corpus "
                           "fingerprint under $RAYDAPT_HOME/indexes); an index of another corpus is refused")
    top_n: int = field(100, "passages retrieved per question")
    max_passages: int = field(8, "most passages packed into one reader input")
    context: int = field(0, "reader positions to fill (default: the model's context)")
    max_question_tokens: int = field(48, "a question keeps its first this many tokens")
    reranker_model: str = field("", "checkpoint dir of the re-ranker's small LM (default: the built small LM)")
    negatives: int = field(7, "hard negatives per question (the retriever's best wrong passages) in re-ranker training")
    reranker_steps: int = field(200, "Adam steps of the re-ranker")
    reranker_batch: int = field(16, "training questions per re-ranker step, split over the Ray Train workers")
    reranker_lr: float = field(0.001, "Adam learning rate of the re-ranker")
    reranker_workers: int = field(2, "Ray Train workers training the re-ranker")
    checkpoint_every: int = field(25, "re-ranker steps between Ray Train checkpoints")
    prompt_length: int = field(8, "soft prompt vectors prepended to the reader's input")
    steps: int = field(300, "Adam steps")
    batch: int = field(16, "training questions per step")
    lr: float = field(0.01, "Adam learning rate")
    white_box_lr: float = field(0.001, "Adam learning rate of the white-box reference (every small-LM weight)")
    eval_every: int = field(50, "score dev every this many steps (and checkpoint)")
    micro_batch: int = field(8, "rows per micro-batch (fixed: results do not depend on replicas/stages)")
    recompute: bool = field(False, "stages keep no activations between forward and backward (rebuild them)")
    replicas: int = field(1, "pipeline replicas of the frozen LM")
    stages: int = field(1, "pipeline stages per replica")
    cpus_per_stage: float = field(1.0, "CPUs per stage actor")
    local: bool = field(False, "serve the model in this process instead of Ray actors")
    fault_injection: str = field("", "kill-stage:after-calls=N[,stage=S][,replica=R]: kill a stage actor mid-run; "
                                 "kill-worker:after-steps=N: kill a re-ranker Ray Train worker at step N (--mode reranker or white_box)")
    output_dir: str = field("runs/reader", "where result.json, the prompt, the log and the checkpoint go")
    resume: bool = field(False, "continue the run in --output-dir from its last checkpoint")
    log_every: int = field(25, "print a summary line above the progress bar every this many steps")

    def __post_init__(self):
        check_directory(self.model, "model", "the built large LM")
        check_directory(self.reranker_model, "reranker_model", "the built small LM")
        for name in ("top_n", "max_passages", "max_question_tokens", "prompt_length", "steps", "batch", "eval_every",
                     "micro_batch", "replicas", "stages", "log_every", "negatives", "reranker_steps", "reranker_batch",
                     "reranker_workers", "checkpoint_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.context >= 0, "context", f"must be >= 0 (0: the model's context), got {self.context}")
        check_positive(self.lr, "lr")
        check_positive(self.reranker_lr, "reranker_lr")
        check_positive(self.white_box_lr, "white_box_lr")
        check(self.reranker_batch % self.reranker_workers == 0, "reranker_batch",
              f"{self.reranker_batch} is not a multiple of --reranker-workers {self.reranker_workers}")
        if self.fault_injection.startswith("kill-worker"):
            check(self.mode in ("reranker", "white_box"), "fault_injection", "kill-worker kills a re-ranker worker: it needs "
                  "--mode reranker (kill-stage:... kills a stage of the reader)")
        check_positive(self.cpus_per_stage, "cpus_per_stage")


# Under 3 minutes on 2 cores, Ray start-up included.
QUICK = {"steps": 30, "eval_every": 15, "top_n": 20, "reranker_steps": 40, "checkpoint_every": 10}
