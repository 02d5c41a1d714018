"""CombLM's combiners on one Ray Train run of 2 workers: the same bits as bare Ray tasks."""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_combiners import HIDDEN, V, synth

JOBS = [("mean", "mean", "expert"), ("constant_scalar", "constant_scalar", "expert"),
        ("entropy_vector", "entropy_vector", "expert"), ("full_scalar", "full_scalar", "expert"),
        ("entropy_scalar+untuned", "entropy_scalar", "untuned")]
OPTIONS = {"vocab_size": V, "seed": 5, "hidden": HIDDEN, "layers": 2, "batch_tokens": 256, "epochs": 2}


def _inputs():
    fits = {"expert": synth(1024, seed=1), "untuned": synth(1024, seed=2, lam=0.05)}
    tests = {small: {"target_test": synth(512, seed=3 + i)} for i, small in enumerate(fits)}
    return fits, tests


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.cluster
@pytest.mark.slow
def test_train_run_fits_every_combiner_bit_identical_to_tasks(ray_cluster, tmp_path):
    from actors.combiner_tasks import fit_all
    from actors.combiner_trainer import fit_combiners_on_train

    fits, tests = _inputs()
    by_tasks = fit_all(JOBS, fits, tests, OPTIONS)
    # One run of 2 workers (each Train run starts its own workers, ~20 s of CPU on 2 cores): the
    # tasks fit one combiner each, so equal bits here mean the split over workers changes nothing.
    storage = tmp_path / "train"
    on_train = fit_combiners_on_train(JOBS, fits, tests, OPTIONS, 2, str(storage))
    assert sorted(on_train) == sorted(by_tasks)
    for name, ref in by_tasks.items():
        got = on_train[name]
        assert _same(got["state"], ref["state"]), name
        assert got["losses"] == ref["losses"] and got["nll"] == ref["nll"] and got["kind"] == ref["kind"]
    assert {r["rank"] for r in on_train.values()} == {0, 1}  # the workers split them
    assert not (storage / "combiners").exists()  # the run's folder is removed once read
    # Real fits: on a 0.3/0.7 mixture a learned weight beats the fixed half-half mean.
    nll = {name: r["nll"]["target_test"] for name, r in by_tasks.items()}
    assert by_tasks["mean"]["state"] == {} and nll["constant_scalar"] < nll["mean"]
