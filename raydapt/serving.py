"""What a job asks of the side that runs it: how to serve the model, which faults to inject, and the
`Runtime` that turns those into pools, students, Train runs and metrics.

The library never imports Ray. A job takes a `Runtime` the way nevergrad's `minimize` takes an
executor: `actors.runner` provides one that runs on a Ray cluster and one that runs in this process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from raydapt.errors import UserError
from raydapt.models.checkpoint import model_info, tensor_index
from raydapt.models.shard import DTYPES, stage_plan
from raydapt.oracle import ReplicaPool

__all__ = ["PoolSpec", "FaultInjection", "parse_fault_spec", "Runtime", "PLACEMENTS", "pin_coordinator_threads"]

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class PoolSpec:
    """How to serve a model: S stages per replica, R replicas, resources per stage."""
    model_dir: str
    stages: int = 1
    replicas: int = 1
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = 0.0
    dtype: str = "float32"
    strategy: str = "PACK"
    threads: int | None = 1
    # Simulated API latency for benchmarks; 0 in real use. Each replica's first stage sleeps this
    # long once per micro-batch, the way a remote API adds a fixed delay per call. It only sleeps:
    # results are identical with or without it. Replicas sleep concurrently (bench/search.py).
    simulated_latency_ms: float = 0.0
    # Gray-box stages (raydapt.graybox) also run backward; a black-box pool's stages refuse it.
    graybox: bool = False
    # Label-logits requests whose rows share a prompted prefix run it once per candidate
    # (raydapt.models.prefix); equal to the unshared path within float rounding, every family.
    prefix_sharing: bool = True
    # A trained extension served on top of the backbone (`raydapt score --adapters`): the
    # adapters.safetensors of a jobs/extend.py run, already checked against model_dir by
    # raydapt.adapters.serve.check_adapters (run_score does, once); each stage attaches its own blocks'.
    adapters: str = ""

    @property
    def simulated_latency_s(self) -> float:
        return self.simulated_latency_ms / 1000.0

    def validate(self) -> None:
        """Every check that needs no worker: bad flags fail here, before a pool starts."""
        if not self.simulated_latency_ms >= 0:
            raise UserError(f"simulated latency must be >= 0 ms, got {self.simulated_latency_ms}")
        info = model_info(self.model_dir)
        if self.stages < 1 or self.stages > info.n_layers:
            raise UserError(f"--stages {self.stages}: the model has {info.n_layers} layers, "
                            f"so stages must be in [1, {info.n_layers}]")
        if self.replicas < 1:
            raise UserError(f"--replicas must be at least 1, got {self.replicas}")
        if not self.cpus_per_stage > 0:
            raise UserError(f"--cpus-per-stage must be > 0, got {self.cpus_per_stage}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.strategy not in PLACEMENTS:
            raise UserError(f"--placement {self.strategy!r} is not one of {', '.join(PLACEMENTS)}")
        stage_plan(self.model_dir, self.stages)  # reads the checkpoint's shapes: fails early and clearly
        tensor_index(self.model_dir)  # opens every safetensors header here, before any actor starts


def pin_coordinator_threads() -> None:
    """Run the coordinator's own float math (BBT's projection, a prompt generator, Adam) on one torch
    thread. A matmul's bits depend on the thread count (BBT's z @ A.T differs in the last place
    between 1 and 2 threads), and in-process stages and the GDFO student set one thread for their
    whole process: without this, `--local` changed a run's results."""
    import torch
    torch.set_num_threads(1)


def parse_fault_spec(text: str, kind: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
                     ) -> dict[str, int] | None:
    """`kind:key=N[,key=N]` -> {key: N} (None when `text` is empty); N are integers >= 0, and the
    required keys' >= 1. One grammar for every fault a job can inject."""
    if not text:
        return None
    form = f"{kind}:" + ",".join([f"{k}=N" for k in required] + [f"[{k}=N]" for k in optional])
    name, _, rest = text.partition(":")
    try:
        fields = dict(item.split("=", 1) for item in rest.split(",") if item)
        values = {k: int(v) for k, v in fields.items()}
    except ValueError:
        values = None
    if (name != kind or values is None or not set(required) <= set(values) <= set(required + optional)
            or any(v < 0 for v in values.values()) or any(values[k] < 1 for k in required)):
        raise UserError(f"--fault-injection {text!r}: expected {form} (integers; required ones >= 1)")
    return values


@dataclass(frozen=True)
class FaultInjection:
    """`kill-stage:after-calls=N[,stage=S][,replica=R]`: kill that stage actor while oracle request
    N+1 is in flight (its micro-batches submitted), to check that the run survives it unchanged."""
    after_calls: int
    stage: int = 0
    replica: int = 0

    @staticmethod
    def parse(text: str) -> "FaultInjection | None":
        fields = parse_fault_spec(text, "kill-stage", ("after-calls",), ("stage", "replica"))
        if fields is None:
            return None
        return FaultInjection(fields["after-calls"], fields.get("stage", 0), fields.get("replica", 0))


class Runtime(Protocol):
    """Where a job's workers run. `actors.runner.RayRuntime` and `LocalRuntime` implement it."""
    local: bool

    def open_pool(self, spec: PoolSpec, fault: FaultInjection | None = None) -> ReplicaPool:
        """Stage workers serving `spec`; `close_pool` releases them."""

    def close_pool(self, pool: ReplicaPool) -> None: ...

    def oracle_reporter(self) -> Any | None:
        """A hook with `request(cost, seconds)` and `failure(restarts)`, or None."""

    def search_reporter(self, method: str, budget: int, run: str) -> Any | None:
        """A hook with `generation(row)` whose series are tagged by `method` and `run`, or None."""

    def student_starter(self) -> Callable[..., Any]:
        """`start(*StudentWorker args)` -> a handle with `submit(method, *args).result()`."""

    def trainer_reporter(self, run: str) -> Any | None:
        """A hook with `record(step, loss)` for a training loop, tagged by `run`, or None."""

    def start(self, num_cpus: int, dashboard: bool = False) -> None:
        """Connect to (or start) the cluster with at least `num_cpus` CPUs before Train runs or tasks."""

    def fine_tune_expert(self, cfg, blocks, model_dir: str, storage: str, fault_marker: str) -> dict:
        """A data-parallel fine-tuning run; {"checkpoint": dir, "losses": [...], "steps": n}."""

    def fit_combiners(self, jobs: list[tuple[str, str, str]], fits: dict, tests: dict, options: dict,
                      workers: int, storage: str) -> dict:
        """Fit every (name, kind, small model) combiner on `workers` Train workers;
        {name: {"state", "losses", "nll", ...}}."""
