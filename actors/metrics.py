"""Ray metrics (`raydapt_*`), exported through each node's metrics agent to Prometheus and the
dashboard. The library reports through plain hook objects; these are the Ray-backed ones."""
from __future__ import annotations

import functools

from raydapt.oracle import Usage

__all__ = ["StageMetrics", "OracleMetrics", "SearchMetrics", "TrainerMetrics"]

LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class StageMetrics:
    """Per stage actor: micro-batches, rows and tokens served, and forward latency."""

    def __init__(self, stage: int, replica: int):
        from ray.util.metrics import Counter, Histogram

        keys = ("stage", "replica")
        self.tags = {"stage": str(stage), "replica": str(replica)}
        self.calls = Counter("raydapt_stage_calls", "micro-batches served by a stage actor", tag_keys=keys)
        self.rows = Counter("raydapt_stage_rows", "rows (prompt x example or sequence) served", tag_keys=keys)
        self.tokens = Counter("raydapt_stage_tokens", "token positions processed", tag_keys=keys)
        self.latency = Histogram("raydapt_stage_forward_seconds", "forward time of one micro-batch",
                                 boundaries=LATENCY_BUCKETS, tag_keys=keys)

    def record(self, rows: int, tokens: int, seconds: float) -> None:
        self.calls.inc(1, self.tags)
        self.rows.inc(rows, self.tags)
        self.tokens.inc(tokens, self.tags)
        self.latency.observe(seconds, self.tags)


# Each metric is created once per process and told apart by its tags: a second instrument of the
# same name replaces the first in Ray's recorder, and a value set shortly before is then never
# exported (a BBT baseline's last api_calls_used was lost when its GDFO run began).
@functools.cache
def _oracle_instruments() -> tuple:
    from ray.util.metrics import Counter, Histogram

    return (Counter("raydapt_oracle_calls", "API calls served (one prompt on one batch)"),
            Counter("raydapt_oracle_examples", "examples scored"),
            Counter("raydapt_oracle_tokens", "tokens scored"),
            Histogram("raydapt_oracle_request_seconds", "latency of one oracle request", boundaries=LATENCY_BUCKETS),
            Counter("raydapt_oracle_stage_restarts", "stage actors restarted after a failure"))


@functools.cache
def _search_gauges() -> dict:
    from ray.util.metrics import Gauge

    return {name: Gauge(f"raydapt_{name}", doc, tag_keys=("method", "run")) for name, doc in (
        ("generation", "generations completed"),
        ("api_calls_used", "API calls spent by the search"),
        ("api_budget_left", "API calls left in the search budget"),
        ("best_train_loss", "best train loss so far"),
        ("dev_accuracy", "dev accuracy at the last dev scoring"),
        ("best_dev_accuracy", "best dev accuracy so far"),
        ("student_agreement", "Spearman rho of the student's forecast vs the teacher's losses"),
        ("student_wait_seconds", "coordinator time blocked on the student, cumulative"),
    )}


class OracleMetrics:
    """The oracle as an API: calls, examples, tokens served, request latency, budget."""

    def __init__(self):
        self.calls, self.examples, self.tokens, self.latency, self.restarts = _oracle_instruments()

    def request(self, cost: Usage, seconds: float) -> None:
        self.calls.inc(cost.calls)
        self.examples.inc(cost.examples)
        self.tokens.inc(cost.tokens)
        self.latency.observe(seconds)

    def failure(self, restarts: int) -> None:
        """Stage actors found restarted, counted once a run's pool is done with."""
        if restarts:
            self.restarts.inc(restarts)


class SearchMetrics:
    """A prompt search's progress: generation, API budget used and left, best loss, dev metric,
    and for GDFO the student's agreement with the teacher. Tagged by method and run, so a GDFO run
    and its BBT baseline (or two jobs on one cluster) write separate series."""

    def __init__(self, method: str, budget: int, run: str):
        self.tags = {"method": method, "run": run}
        self.budget = budget
        self.gauges = _search_gauges()

    def generation(self, row: dict) -> None:
        values = {"generation": row["generation"], "api_calls_used": row["api_calls"],
                  "api_budget_left": self.budget - row["api_calls"], "best_train_loss": row["best_train_loss"],
                  "dev_accuracy": row.get("dev_accuracy"), "best_dev_accuracy": row.get("best_dev_accuracy"),
                  "student_agreement": row.get("rho"), "student_wait_seconds": row.get("student_wait_s")}
        for name, value in values.items():
            if value is not None:
                self.gauges[name].set(float(value), self.tags)


@functools.cache
def _trainer_gauges() -> tuple:
    from ray.util.metrics import Gauge

    return (Gauge("raydapt_trainer_step", "optimizer steps completed", tag_keys=("run",)),
            Gauge("raydapt_trainer_loss", "training loss, mean over workers", tag_keys=("run",)))


class TrainerMetrics:
    """A training loop (CombLM's expert fine-tuning from Ray Train's rank 0; an ID-PT run in its
    coordinator): step and loss, tagged by run, so several runs in one process keep their series."""

    def __init__(self, run: str):
        self.tags = {"run": run}
        self.step, self.loss = _trainer_gauges()

    def record(self, step: int, loss: float) -> None:
        self.step.set(step, self.tags)
        self.loss.set(loss, self.tags)
