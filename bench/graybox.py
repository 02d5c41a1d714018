"""A gray-box training step through the frozen LM's stages, measured side by side in one run (the
machine is shared; ratios, not times).

One step is what a method training around the frozen LM does per batch: `FrozenLM(oracle)(ids,
lengths, labels=ids, prompt=prompt)` (the LM loss on every token, a prompt of L vectors per row
that wants a gradient), then `out["loss"].sum().backward()`: every micro-batch forward, then
every micro-batch backward, back to the prompt.

(a) the step through the 2-stage Ray pipeline (1 replica) vs. in one process (torch's default
    threads, one per core), and vs. in one process on 1 thread: on a shared machine torch's
    threads can wait on each other far longer than they compute, which this case tells apart;
(b) the step over 2 replicas x 1 stage vs. 1 replica x 1 stage (a Ray pool of 2 replicas, 1 CPU per
    stage, used whole and through its first replica alone: the same actors, only R differs);
(c) the 2-stage pipeline rebuilding each graph at backward (`ShardedGrayBox(recompute=True)`: the
    stages keep nothing between forward and backward) vs. keeping it.
The prompt's gradient must be bitwise identical in every case.

    python bench/graybox.py [--model DIR] [--rows 32] [--prompt-length 10] [--micro-batch 8] [--repeats 5]
    python bench/graybox.py --quick          # a smoke run, under a minute

The figures go to --output (default results/bench/graybox.json), which `python -m raydapt.results`
renders into the README's Performance section.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from actors.cluster import init_ray
from actors.pipeline import LocalPool, RayPool
from raydapt.defaults import default_model_dir
from raydapt.graybox import FrozenLM, ShardedGrayBox
from raydapt.models.checkpoint import model_info
from raydapt.results import bench_output, machine, write_bench
from raydapt.serving import PoolSpec

FULL = {"rows": 32, "prompt_length": 10, "micro_batch": 8, "repeats": 15}  # 5 gave 1.16x and 1.41x in two runs
QUICK = {"rows": 8, "prompt_length": 4, "micro_batch": 4, "repeats": 2}
CASES = ("in_process", "in_process_1_thread", "pipeline_keep", "pipeline_recompute", "replicas_1", "replicas_2")


def inputs(model_dir: str, rows: int, prompt_length: int, synthetic: bool) -> tuple[np.ndarray, np.ndarray]:
    """The default task's test texts as its template encodes them (no placeholder slots: the prompt
    is inserted by the oracle), or random ids of a similar shape for a model without a tokenizer."""
    info = model_info(model_dir)
    if not synthetic:
        from transformers import AutoTokenizer

        from raydapt.data.tasks import default_task, encode_examples
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError):
            raise SystemExit(f"error: {model_dir} has no tokenizer; pass --synthetic for random inputs")
        task = default_task(seed=0)
        texts = [task.test["text"][i % len(task.test["text"])] for i in range(rows)]
        return encode_examples(tokenizer, texts, task.template,
                               max_length=info.max_positions - prompt_length)
    rng = np.random.default_rng(0)
    most = min(info.max_positions - prompt_length, 40)
    lengths = rng.integers(most // 2, most + 1, rows)
    ids = rng.integers(4, info.vocab_size, (rows, most))
    ids[np.arange(most)[None, :] >= lengths[:, None]] = 0
    return ids.astype(np.int64), lengths.astype(np.int64)


class FirstReplica:
    """The first replica of a pool, as a pool of one: R = 1 and R = 2 on the very same actors."""

    n_replicas = 1

    def __init__(self, pool):
        self.pool, self.info = pool, pool.info

    def train_forward(self, replica: int, key: str, mb: dict):
        return self.pool.train_forward(replica, key, mb)

    def train_backward(self, handle, grad):
        return self.pool.train_backward(handle, grad)

    def gather(self, handles: list) -> list:
        return self.pool.gather(handles)


def training_step(oracle, ids: np.ndarray, lengths: np.ndarray, prompts: np.ndarray) -> tuple[np.ndarray, float, float]:
    """One step: (the prompt's gradient, forward seconds, backward seconds)."""
    prompt = torch.from_numpy(prompts.copy()).requires_grad_(True)
    began = time.perf_counter()
    out = FrozenLM(oracle)(ids, lengths, ids, prompt=prompt)
    middle = time.perf_counter()
    out["loss"].sum().backward()
    ended = time.perf_counter()
    return prompt.grad.numpy(), middle - began, ended - middle


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the built large LM)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random token ids (for a model without a tokenizer, such as the tests' tiny checkpoints)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run under a minute: {QUICK}")
    parser.add_argument("--rows", type=int, default=None, help=f"rows per step (default {FULL['rows']})")
    parser.add_argument("--prompt-length", type=int, default=None,
                        help=f"prompt vectors per row (default {FULL['prompt_length']})")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help=f"rows per micro-batch (default {FULL['micro_batch']})")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed repeats (default {FULL['repeats']})")
    parser.add_argument("--output", type=Path, default=bench_output("graybox"),
                        help="where the figures are written as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in FULL}
    if min(sizes.values()) < 1:
        parser.error("--rows, --prompt-length, --micro-batch and --repeats must be >= 1")

    load_before = os.getloadavg()
    model_dir = args.model or str(default_model_dir("large"))
    mb = sizes["micro_batch"]
    ids, lengths = inputs(model_dir, sizes["rows"], sizes["prompt_length"], args.synthetic)
    info = model_info(model_dir)
    prompts = np.random.default_rng(0).normal(0, 0.02, (sizes["rows"], sizes["prompt_length"], info.embed_dim)
                                              ).astype(np.float32)

    default_threads = torch.get_num_threads()  # this process's; no pool below sets it (threads=None)
    threads = {"in_process_1_thread": 1}

    def step(name: str) -> tuple[np.ndarray, float, float]:
        torch.set_num_threads(threads.get(name, default_threads))
        try:
            return training_step(oracles[name], ids, lengths, prompts)
        finally:
            torch.set_num_threads(default_threads)

    import ray
    started_ray = not ray.is_initialized()
    init_ray(num_cpus=max(os.cpu_count() or 1, 4))  # 2 stages + 2 replicas, which take turns
    pools = []
    try:
        for kw in ({"stages": 2}, {"replicas": 2}):
            pools.append(RayPool(PoolSpec(model_dir, cpus_per_stage=1, graybox=True, **kw)))
        two_stages, two_replicas = pools
        in_process = LocalPool(PoolSpec(model_dir, threads=None, graybox=True))
        oracles = {"in_process": ShardedGrayBox(in_process, mb), "in_process_1_thread": ShardedGrayBox(in_process, mb),
                   "pipeline_keep": ShardedGrayBox(two_stages, mb),
                   "pipeline_recompute": ShardedGrayBox(two_stages, mb, recompute=True),
                   "replicas_1": ShardedGrayBox(FirstReplica(two_replicas), mb),
                   "replicas_2": ShardedGrayBox(two_replicas, mb)}
        grads = {name: [] for name in CASES}
        for name in CASES:  # warm-up: first calls pay for lazy initialisation
            grads[name].append(step(name)[0])
        times = {name: {"step": [], "forward": [], "backward": []} for name in CASES}
        for _ in range(sizes["repeats"]):  # interleaved, so drift in machine load hits every case alike
            for name in CASES:
                grad, fwd, bwd = step(name)
                grads[name].append(grad)
                times[name]["step"].append(fwd + bwd)
                times[name]["forward"].append(fwd)
                times[name]["backward"].append(bwd)
        # Graphs still held per pool, replica and stage (in process, 2 stages, 2 replicas): 0 after backward.
        kept = [pool.kept_graphs() for pool in (in_process, *pools)]
    finally:
        for pool in pools:
            pool.shutdown()
        if started_ray:
            ray.shutdown()

    reference = grads["in_process"][0]
    identical = all(np.array_equal(reference, g) for gs in grads.values() for g in gs)
    median = {name: statistics.median(times[name]["step"]) for name in CASES}
    median_forward = {name: statistics.median(times[name]["forward"]) for name in CASES}
    median_backward = {name: statistics.median(times[name]["backward"]) for name in CASES}
    ratios = {"pipeline_vs_in_process": median["pipeline_keep"] / median["in_process"],
              "pipeline_vs_in_process_1_thread": median["pipeline_keep"] / median["in_process_1_thread"],
              "speedup_2_replicas": median["replicas_1"] / median["replicas_2"],
              "recompute_over_keep": median["pipeline_recompute"] / median["pipeline_keep"]}
    micro_batches = -(-sizes["rows"] // mb)
    print(f"model {model_dir} ({'synthetic inputs' if args.synthetic else 'default task'}): one training step = "
          f"{sizes['rows']} rows x (mean {lengths.mean():.1f} tokens + {sizes['prompt_length']} prompt vectors), "
          f"LM loss on every token, forward + backward to the prompt, {micro_batches} micro-batches of {mb}, "
          f"median of {sizes['repeats']} repeats")
    for name in CASES:
        print(f"  {name:20s} {median[name] * 1000:8.1f} ms  (forward {median_forward[name] * 1000:.1f}, "
              f"backward {median_backward[name] * 1000:.1f})")
    print(f"  2-stage pipeline / in process      {ratios['pipeline_vs_in_process']:.2f}x  (goal <= 1.2x; "
          f"{default_threads} torch threads in process)")
    print(f"  2-stage pipeline / in process, 1 thread  {ratios['pipeline_vs_in_process_1_thread']:.2f}x")
    print(f"  2 replicas vs 1 (1 stage each)     {ratios['speedup_2_replicas']:.2f}x faster")
    print(f"  recompute / keep (2-stage)         {ratios['recompute_over_keep']:.2f}x")
    print(f"  prompt gradients bitwise identical in every case and repeat: {identical}")
    print(f"  graphs left on the stages after the last step: {kept}")
    figures = {"model": model_dir, "synthetic": args.synthetic, "sizes": sizes, "quick": args.quick,
               "in_process_threads": default_threads, "mean_input_tokens": float(lengths.mean()), "micro_batches": micro_batches,
               "median_s": median, "median_forward_s": median_forward, "median_backward_s": median_backward,
               "ratios": ratios, "identical": identical, "kept_graphs_after": kept, "machine": machine(load_before)}
    print(json.dumps(figures))
    write_bench(args.output, figures)
    return figures


if __name__ == "__main__":
    main()
