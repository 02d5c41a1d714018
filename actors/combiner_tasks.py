"""CombLM's combiners fitted concurrently, one Ray task each.

A task rather than a Ray Train run: a combiner is a few thousand to a few million parameters fitted
on cached outputs, so one process does it in seconds to a minute; data-parallel
workers would spend more on start-up and gradient exchange than on the fit. The cached arrays are
put in the object store once and read zero-copy by every task on a node.
"""
from __future__ import annotations

import time

__all__ = ["fit_and_evaluate", "fit_all"]


def fit_and_evaluate(kind: str, fit_arrays: dict, test_arrays: dict, options: dict) -> dict:
    """Fit one combiner and return its state, losses, test NLLs per split and when it ran."""
    import torch

    from raydapt.comblm.combiners import combiner_state, evaluate_nll, fit, make_combiner

    began = time.time()
    torch.set_num_threads(1)
    combiner = make_combiner(kind, options["vocab_size"], options["seed"], hidden=options["hidden"],
                             layers=options["layers"])
    losses = fit(combiner, fit_arrays, batch_tokens=options["batch_tokens"],
                 epochs=options["epochs"], seed=options["seed"])
    nll = {split: evaluate_nll(combiner, arrays) for split, arrays in test_arrays.items()}
    state = {k: v.numpy() for k, v in combiner_state(combiner).items()}
    return {"kind": kind, "state": state, "losses": losses, "nll": nll, "began": began, "ended": time.time()}


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
