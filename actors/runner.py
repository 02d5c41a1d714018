"""The two `raydapt.serving.Runtime`s a job can run on: Ray (actors, Ray Train, tasks, metrics) and
this process (`--local`: stages in-process, the student inline, no metrics).

Jobs pick one with `runtime_for(cfg.local)` and hand it to the library, which never imports Ray.
"""
from __future__ import annotations

import math
import os

from raydapt.gdfo.worker import InlineStudent
from raydapt.serving import FaultInjection, PoolSpec

from actors.cluster import init_ray
from actors.pipeline import LocalPool

__all__ = ["RayRuntime", "LocalRuntime", "runtime_for"]


class _TrainRuns:
    """Ray Train and Ray tasks: CombLM needs them whether or not its oracle is in-process."""

    def start(self, num_cpus: int, dashboard: bool = False) -> None:
        init_ray(num_cpus=max(num_cpus, 2), dashboard=dashboard)

    def fine_tune_expert(self, cfg, blocks, model_dir: str, storage: str, fault_marker: str) -> dict:
        from actors.expert_trainer import fine_tune_expert
        return fine_tune_expert(cfg, blocks, model_dir, storage, fault_marker)

    def train_extension(self, cfg, adapter_json: str, blocks, original, plan, storage: str, fault_marker: str) -> dict:
        from actors.extend_trainer import train_extension
        return train_extension(cfg, adapter_json, blocks, original, plan, storage, fault_marker)

    def meta_train_mltd(self, cfg, cfg_dict: dict, tasks: list, storage: str, fault_marker: str) -> dict:
        from actors.mltd_trainer import meta_train
        return meta_train(cfg, cfg_dict, tasks, storage, fault_marker)

    def train_reranker(self, cfg, config: dict, storage: str, fault_marker: str) -> dict:
        from actors.reranker_trainer import train_reranker
        return train_reranker(cfg, config, storage, fault_marker)

    def fit_combiners(self, jobs, fits, tests, options, workers: int, storage: str) -> dict:
        from actors.combiner_trainer import fit_combiners_on_train
        return fit_combiners_on_train(jobs, fits, tests, options, workers, storage)


class RayRuntime(_TrainRuns):
    """Stage actors on the cluster (a local Ray is started if none is running), the GDFO student in
    its own actor, `raydapt_*` metrics exported to the dashboard."""
    local = False

    def open_pool(self, spec: PoolSpec, fault: FaultInjection | None = None):
        from actors.pipeline import RayPool
        # A local Ray advertises at least what the pool asks for (+1 for a GDFO student): on a 2-core
        # laptop, 2 replicas x 2 stages still start; the stages take turns in the pipeline anyway.
        needed = math.ceil(spec.replicas * spec.stages * spec.cpus_per_stage) + 1
        init_ray(num_cpus=max(os.cpu_count() or 1, needed))
        return RayPool(spec, fault)

    def close_pool(self, pool) -> None:
        pool.shutdown()

    def oracle_reporter(self):
        from actors.metrics import OracleMetrics
        return OracleMetrics()

    def search_reporter(self, method: str, budget: int, run: str):
        from actors.metrics import SearchMetrics
        return SearchMetrics(method, budget, run)

    def student_starter(self):
        from actors.student import RayStudent
        return RayStudent

    def trainer_reporter(self, run: str):
        from actors.metrics import TrainerMetrics
        return TrainerMetrics(run)


class LocalRuntime(_TrainRuns):
    """Everything the oracle and the search need in this process: no cluster, no metrics."""
    local = True

    def open_pool(self, spec: PoolSpec, fault: FaultInjection | None = None):
        if fault:  # jobs refuse --fault-injection with --local before they get here
            raise ValueError("in-process stages cannot be killed: fault injection needs RayRuntime")
        return LocalPool(spec)

    def close_pool(self, pool) -> None:
        pass

    def oracle_reporter(self):
        return None

    def search_reporter(self, method: str, budget: int, run: str):
        return None

    def student_starter(self):
        return InlineStudent

    def trainer_reporter(self, run: str):
        return None


def runtime_for(local: bool) -> RayRuntime | LocalRuntime:
    return LocalRuntime() if local else RayRuntime()
