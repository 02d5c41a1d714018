"""Pipelines of stage workers, in one process or as Ray actors, and the oracles built on them.

A replica is S stage workers in a chain. `RayPool` places each replica's stages in a placement
group (PACK by default) and runs micro-batches GPipe-style: every micro-batch's chain of stage
calls is submitted at once, activations pass stage to stage as object refs, and each stage works
on micro-batch i+1 while the next works on micro-batch i.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from raydapt.models.checkpoint import model_info
from raydapt.oracle import Budget, ShardedOracle
from raydapt.serving import FaultInjection, PoolSpec

from actors.stage import StageWorker

__all__ = ["LocalPool", "RayPool", "local_oracle", "ray_oracle"]


class LocalPool:
    """Replicas of in-process stage workers: the oracle without Ray (tests, small runs)."""

    def __init__(self, spec: PoolSpec):
        spec.validate()
        self.info = model_info(spec.model_dir)
        self.n_replicas = spec.replicas
        self.prefix_sharing = spec.prefix_sharing
        # Each replica owns its stages, as on Ray: a replica-invariance test then compares real copies.
        self.replicas = [[StageWorker(spec.model_dir, spec.stages, s, spec.dtype, "cpu", spec.threads,
                                      simulated_latency_s=spec.simulated_latency_s if s == 0 else 0.0,
                                      graybox=spec.graybox, adapters=spec.adapters)
                          for s in range(spec.stages)] for _ in range(spec.replicas)]

    def put(self, value: Any) -> Any:
        return value

    def submit(self, replica: int, micro_batch: dict, prompts: Any) -> Any:
        hidden = None
        for stage in self.replicas[replica]:
            hidden = stage.forward(micro_batch, hidden, prompts)
        return hidden

    def gather(self, handles: list) -> list:
        return handles

    def train_forward(self, replica: int, key: str, mb: dict) -> dict:
        inputs, hidden = [], None
        for stage in self.replicas[replica]:
            inputs.append(hidden)
            hidden = stage.train_forward(key, mb, hidden)
        return {"replica": replica, "key": key, "mb": mb, "inputs": inputs, "output": hidden}

    def train_backward(self, handle: dict, grad: Any) -> Any:
        chain = self.replicas[handle["replica"]]
        for stage, hidden in zip(reversed(chain), reversed(handle["inputs"])):
            grad = stage.train_backward(handle["key"], handle["mb"], hidden, grad)
        return grad

    def kept_graphs(self) -> list[list[int]]:
        return [[s.kept_graphs() for s in chain] for chain in self.replicas]

    def frozen_state(self) -> list[list[dict]]:
        return [[s.frozen_state() for s in chain] for chain in self.replicas]

    def describe(self) -> list[list[dict]]:
        return [[s.describe() for s in chain] for chain in self.replicas]


class RayPool:
    """R replicas x S stage actors, each replica in its own placement group.

    Stage actors restart after a crash (reloading their shard in __init__), and Ray re-runs the
    stage calls the crash interrupted on the restarted actor (`max_task_retries`), their inputs
    being object refs that outlived it. A re-run computes exactly what the first run would have,
    so a failure never changes a result. Measured with the default LM at S = 2, a stage killed
    mid-request: Ray's retries gave the same bytes and left nothing for a hand-written retry,
    which was removed.
    """

    MAX_TASK_RETRIES = 3  # per stage call; a stage that fails more often is broken, not unlucky

    def __init__(self, spec: PoolSpec, fault: FaultInjection | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec.validate()
        self._ray = ray
        self.info = model_info(spec.model_dir)
        self.n_replicas = spec.replicas
        self.prefix_sharing = spec.prefix_sharing
        model_dir = str(Path(spec.model_dir).resolve())
        bundle = {"CPU": spec.cpus_per_stage, **({"GPU": spec.gpus_per_stage} if spec.gpus_per_stage else {})}
        threads = spec.threads or max(1, int(spec.cpus_per_stage))
        device = "cuda" if spec.gpus_per_stage else "cpu"
        actor_cls = ray.remote(StageWorker)
        self.groups, self.replicas = [], []
        tag = uuid.uuid4().hex[:8]  # names are cluster-wide: several pools may serve at once
        for r in range(spec.replicas):
            group = placement_group([bundle] * spec.stages, strategy=spec.strategy, name=f"raydapt-{tag}-replica-{r}")
            self.groups.append(group)
            self.replicas.append([
                actor_cls.options(
                    num_cpus=spec.cpus_per_stage, num_gpus=spec.gpus_per_stage, max_restarts=-1,
                    max_task_retries=self.MAX_TASK_RETRIES,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=s),
                ).remote(model_dir, spec.stages, s, spec.dtype, device, threads, r,
                         simulated_latency_s=spec.simulated_latency_s if s == 0 else 0.0, graybox=spec.graybox,
                         adapters=spec.adapters)
                for s in range(spec.stages)])
        ray.get([g.ready() for g in self.groups])
        ray.get([a.ready.remote() for chain in self.replicas for a in chain])
        self.fault, self.requests = fault, 0
        self._pids = self._stage_pids()

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def submit(self, replica: int, micro_batch: dict, prompts: Any) -> Any:
        hidden = None
        for actor in self.replicas[replica]:
            hidden = actor.forward.remote(micro_batch, hidden, prompts)
        return hidden

    def gather(self, handles: list) -> list:
        """Results in order (a stage call cut off by a crash is re-run by Ray, see the class doc)."""
        self.requests += 1
        if self.fault and self.requests == self.fault.after_calls + 1:
            self._ray.kill(self.replicas[self.fault.replica][self.fault.stage], no_restart=False)
        return self._ray.get(handles)

    def train_forward(self, replica: int, key: str, mb: dict) -> dict:
        """Submit a gray-box micro-batch's forward down `replica`'s chain; the handle keeps each
        stage's input ref, which backward (and a stage rebuilding a lost graph) reads again."""
        mb_ref, inputs, hidden = self._ray.put(mb), [], None
        for actor in self.replicas[replica]:
            inputs.append(hidden)
            hidden = actor.train_forward.remote(key, mb_ref, hidden)
        return {"replica": replica, "key": key, "mb": mb_ref, "inputs": inputs, "output": hidden}

    def train_backward(self, handle: dict, grad: Any) -> Any:
        """Submit the backward S -> 1 of a micro-batch; gradients travel as object refs."""
        chain = self.replicas[handle["replica"]]
        for actor, hidden in zip(reversed(chain), reversed(handle["inputs"])):
            grad = actor.train_backward.remote(handle["key"], handle["mb"], hidden, grad)
        return grad

    def kept_graphs(self) -> list[list[int]]:
        return [self._ray.get([a.kept_graphs.remote() for a in chain]) for chain in self.replicas]

    def frozen_state(self) -> list[list[dict]]:
        return [self._ray.get([a.frozen_state.remote() for a in chain]) for chain in self.replicas]

    def _stage_pids(self) -> dict:
        return {(r, s): info["pid"] for r, chain in enumerate(self.replicas)
                for s, info in enumerate(self._ray.get([a.describe.remote() for a in chain]))}

    def fault_report(self) -> dict:
        """Whether a fault was injected, and how many stage actors run in another process than at
        the start (a restarted actor is a new process)."""
        pids = self._stage_pids()
        return {"injected": self.fault is not None, "stage_restarts": sum(pids[k] != self._pids[k] for k in pids)}

    def describe(self) -> list[list[dict]]:
        return [self._ray.get([a.describe.remote() for a in chain]) for chain in self.replicas]

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group
        for chain in self.replicas:
            for actor in chain:
                self._ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)


def local_oracle(model_dir: str | Path, stages: int = 1, micro_batch_size: int = 32,
                 budget: Budget | None = None, threads: int | None = None,
                 prefix_sharing: bool = True) -> ShardedOracle:
    pool = LocalPool(PoolSpec(str(model_dir), stages=stages, threads=threads, prefix_sharing=prefix_sharing))
    return ShardedOracle(pool, micro_batch_size, budget or Budget())


def ray_oracle(spec: PoolSpec, micro_batch_size: int = 32, budget: Budget | None = None) -> ShardedOracle:
    return ShardedOracle(RayPool(spec), micro_batch_size, budget or Budget())
