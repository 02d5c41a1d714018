"""CombLM's combiners fitted in one Ray Train run (what jobs/comblm.py does) vs. as bare Ray tasks
(what it did before), side by side in one Ray session: the overhead of Ray Train's worker group.

Inputs are cached-output arrays of the quick preset's shape (its fit and test token counts, the
default vocabulary, float16 full distributions), drawn at random: fitting time depends on the
shapes, not on the values. Both ways fit the same 12 combiners and must give the same bits.

    python bench/combiners.py [--tokens 12000] [--vocab 4096] [--workers 2] [--repeats 2] [--output FILE.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from actors.cluster import init_ray
from actors.combiner_tasks import fit_all
from actors.combiner_trainer import fit_combiners_on_train
from raydapt.comblm.combiners import COMBINERS
from raydapt.comblm.config import QUICK, CombLMConfig
from raydapt.results import bench_output, machine, write_bench


def cached_arrays(tokens: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """One small model's and the large model's outputs on `tokens` positions, as the cache holds them."""
    rng = np.random.default_rng(seed)
    arrays = {"gold": rng.integers(0, vocab, tokens)}
    for model in ("small", "large"):
        logits = rng.standard_normal((tokens, vocab), dtype=np.float32) * 3
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        arrays[f"{model}_full"] = logp.astype(np.float16)
        arrays[f"{model}_gold"] = np.take_along_axis(logp, arrays["gold"][:, None], -1)[:, 0]
        arrays[f"{model}_entropy"] = -(np.exp(logp) * logp).sum(-1)
    return arrays


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=QUICK["fit_tokens"], help="fit-set tokens")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=CombLMConfig.combiner_workers)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the fit set (the job: 10)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=bench_output("combiners"),
                        help="where the figures are written as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.tokens, args.vocab, args.workers, args.epochs, args.repeats) < 1:
        parser.error("--tokens, --vocab, --workers, --epochs and --repeats must be >= 1")
    load = os.getloadavg()
    jobs = [(k, k, "expert") for k in COMBINERS] + [(f"{k}+untuned", k, "untuned")
                                                     for k in ("mean", "constant_scalar", "entropy_scalar")]
    fits = {"expert": cached_arrays(args.tokens, args.vocab, 1), "untuned": cached_arrays(args.tokens, args.vocab, 2)}
    tests = {s: {"target_test": cached_arrays(args.tokens // 2, args.vocab, 3)} for s in fits}
    options = {"vocab_size": args.vocab, "seed": 0, "hidden": QUICK["hidden"], "layers": 2,
               "batch_tokens": 1024, "epochs": args.epochs}
    init_ray(num_cpus=max(os.cpu_count() or 1, args.workers))
    times = {"tasks": [], "train": []}
    with tempfile.TemporaryDirectory(prefix="raydapt-bench-") as storage:
        for _ in range(args.repeats):  # alternate, so drift in the machine's load hits both alike
            start = time.perf_counter()
            by_tasks = fit_all(jobs, fits, tests, options)
            times["tasks"].append(time.perf_counter() - start)
            start = time.perf_counter()
            on_train = fit_combiners_on_train(jobs, fits, tests, options, args.workers, storage)
            times["train"].append(time.perf_counter() - start)
    identical = all(by_tasks[n]["state"].keys() == on_train[n]["state"].keys() and
                    all(np.array_equal(by_tasks[n]["state"][k], on_train[n]["state"][k]) for k in by_tasks[n]["state"])
                    for n in by_tasks)
    tasks_s, train_s = statistics.median(times["tasks"]), statistics.median(times["train"])
    figures = {"bench": "combiners", "combiners": len(jobs), "fit_tokens": args.tokens, "vocab": args.vocab,
               "epochs": args.epochs, "train_workers": args.workers, "repeats": args.repeats,
               "tasks_s": round(tasks_s, 2), "train_run_s": round(train_s, 2),
               "train_over_tasks": round(train_s / tasks_s, 3), "bit_identical": identical,
               "times_s": times, "machine": machine(load)}
    print(f"{len(jobs)} combiners: Ray tasks {tasks_s:.1f} s, one Ray Train run of {args.workers} workers "
          f"{train_s:.1f} s ({train_s / tasks_s:.2f}x); bit-identical: {identical}")
    write_bench(args.output, figures)
    return figures


if __name__ == "__main__":
    main()
