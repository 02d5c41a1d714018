"""CombLM's combiners fitted in one Ray Train run: W workers split the combiners, balanced by their
measured cost (`raydapt.comblm.combiners.balance_fits`); each fits its share on one thread
(`raydapt.comblm.combiners.fit_and_evaluate`) and writes them as safetensors + JSON into the run's
checkpoint, which Ray Train merges from every worker.

The combiners are independent and small (thousands to millions of parameters on cached outputs),
so workers split the combiners rather than the data: no gradient exchange, and a combiner's bits do
not depend on W or on which worker fitted it. `bench/combiners.py` measures this run against bare
Ray tasks.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from raydapt.comblm.combiners import balance_fits, fit_and_evaluate

__all__ = ["fit_combiners_on_train"]

EMPTY = "empty"  # a combiner without parameters (mean) is saved as one empty tensor


def _fit_share(config: dict) -> None:
    """A Train worker: fit the combiners balance_fits gives this rank, report them as one checkpoint."""
    import ray
    import ray.train
    from safetensors.numpy import save_file

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    fits, tests = ray.get(config["fits"]), ray.get(config["tests"])
    out = Path(tempfile.mkdtemp(prefix="rdpt-combiners-"))
    owner = balance_fits([kind for _, kind, _ in config["jobs"]], world)
    for i, (name, kind, small) in enumerate(config["jobs"]):
        if owner[i] != rank:
            continue
        res = fit_and_evaluate(kind, fits[small], tests[small], config["options"])
        save_file(res.pop("state") or {EMPTY: np.zeros(0, np.float32)}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(res | {"rank": rank}))
    ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
    shutil.rmtree(out, ignore_errors=True)


def _read(directory: str, name: str) -> dict:
    from safetensors.numpy import load_file

    res = json.loads(Path(directory, f"{name}.json").read_text())
    state = load_file(str(Path(directory, f"{name}.safetensors")))
    return res | {"state": {} if set(state) == {EMPTY} else state}


def fit_combiners_on_train(jobs: list[tuple[str, str, str]], fits: dict, tests: dict, options: dict,
                           workers: int, storage: str, cpus_per_worker: float = 1.0) -> dict[str, dict]:
    """Fit every (name, kind, small_model) job in one TorchTrainer run of min(workers, jobs) workers.

    Returns {name: {"kind", "state" (numpy), "losses", "nll", "began", "ended", "rank"}}, the same
    as `actors.combiner_tasks.fit_all` plus the worker that fitted it. The run's directory under
    `storage` is removed once read."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"jobs": jobs, "options": options, "fits": ray.put(fits), "tests": ray.put(tests)}
    n = max(1, min(workers, len(jobs)))
    name = "combiners"
    trainer = TorchTrainer(
        _fit_share, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=n, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, logging_config=LoggingConfig(log_level="WARNING")))
    shutil.rmtree(Path(storage, name), ignore_errors=True)  # never restore an earlier run's share
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        fitted = {job: _read(d, job) for job, _, _ in jobs}
    shutil.rmtree(Path(storage, name), ignore_errors=True)
    return fitted
