"""CombLM's combiners fitted as bare Ray tasks, one each: the baseline `bench/combiners.py` measures
the Ray Train run (`actors.combiner_trainer`, what jobs use) against, and the reference its test
compares bits with. The cached arrays are put in the object store once and read zero-copy."""
from __future__ import annotations

from raydapt.comblm.combiners import fit_and_evaluate

__all__ = ["fit_all"]


def fit_all(jobs: list[tuple[str, str, str]], fits: dict, tests: dict, options: dict) -> dict[str, dict]:
    """Fit every (name, kind, small_model) job as a Ray task at once.

    `fits[small]` and `tests[small][split]` are the combiner arrays for each small model ("expert",
    "untuned"); each is put in the object store once.
    """
    import ray

    fit_refs = {small: ray.put(arrays) for small, arrays in fits.items()}
    test_refs = {small: ray.put(splits) for small, splits in tests.items()}
    task = ray.remote(num_cpus=1)(fit_and_evaluate)
    futures = {name: task.remote(kind, fit_refs[small], test_refs[small], options) for name, kind, small in jobs}
    return dict(zip(futures, ray.get(list(futures.values()))))
