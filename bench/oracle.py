"""Oracle throughput, measured side by side in one run (the machine is shared; ratios, not times).

(a) a population of P prompts on N examples through the 2-stage Ray pipeline vs. the same request
    in one process;
(b) the population scored in one batched request vs. one candidate per request, as BBT's reference
    code does (one forward of the whole train set per candidate), in process and through the pipeline.

    python bench/oracle.py [--model DIR] [--population 20] [--examples 32] [--repeats 5] [--output FILE.json]

The figures go to --output (default results/bench/oracle.json), which `python -m raydapt.results`
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
from transformers import AutoTokenizer

from actors.cluster import init_ray
from actors.pipeline import LocalPool, RayPool
from raydapt.data.tasks import default_task, encode_examples, label_token_ids
from raydapt.defaults import default_model_dir
from raydapt.oracle import ShardedOracle
from raydapt.results import bench_output, machine, write_bench
from raydapt.serving import PoolSpec


def inputs(model_dir, n_examples: int, prompt_length: int):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = default_task(seed=0)
    texts = task.test["text"][:n_examples]
    ids, lengths = encode_examples(tokenizer, texts, task.template, prompt_length, placeholder_id=tokenizer.pad_token_id)
    return ids, lengths, label_token_ids(tokenizer, task.verbalizer)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the built large LM)")
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=50)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=bench_output("oracle"),
                        help="where the figures are written as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.population, args.examples, args.prompt_length, args.micro_batch, args.repeats) < 1:
        parser.error("--population, --examples, --prompt-length, --micro-batch and --repeats must be >= 1")
    load_before = os.getloadavg()
    model_dir = args.model or str(default_model_dir("large"))
    ids, lengths, label_ids = inputs(model_dir, args.examples, args.prompt_length)
    info_dim = LocalPool(PoolSpec(model_dir)).info.embed_dim
    prompts = np.random.default_rng(0).normal(0, 0.02, (args.population, args.prompt_length, info_dim)).astype(np.float32)

    init_ray()
    in_process = ShardedOracle(LocalPool(PoolSpec(model_dir, threads=None)), args.micro_batch)
    ray_pool = RayPool(PoolSpec(model_dir, stages=2, cpus_per_stage=1))
    pipeline = ShardedOracle(ray_pool, args.micro_batch)

    def batched(oracle):
        return lambda: oracle.label_logits(ids, lengths, label_ids, prompts)

    def one_by_one(oracle):  # BBT reference: a forward of the whole train set per candidate
        return lambda: [oracle.label_logits(ids, lengths, label_ids, prompts[p:p + 1]) for p in range(len(prompts))]

    cases = {"in_process_batched": batched(in_process), "pipeline_batched": batched(pipeline),
             "in_process_one_by_one": one_by_one(in_process), "pipeline_one_by_one": one_by_one(pipeline)}
    for fn in cases.values():  # warm-up: first calls pay for lazy initialisation
        fn()
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every case alike
        for name, fn in cases.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "pipeline_vs_in_process": median["pipeline_batched"] / median["in_process_batched"],
        "batched_speedup_in_process": median["in_process_one_by_one"] / median["in_process_batched"],
        "batched_speedup_pipeline": median["pipeline_one_by_one"] / median["pipeline_batched"],
    }
    print(f"model {model_dir}: population {args.population} x {args.examples} examples, "
          f"prompt {args.prompt_length} tokens, mean input {lengths.mean():.1f} tokens, {args.repeats} repeats")
    for name, t in median.items():
        print(f"  {name:24s} {t * 1000:8.1f} ms (median)")
    print("  (a) 2-stage pipeline / in-process      "
          f"{ratios['pipeline_vs_in_process']:.2f}x  (goal <= 1.15x)")
    print("  (b) one-by-one / batched, in process   "
          f"{ratios['batched_speedup_in_process']:.2f}x  (goal >= 3x)")
    print("  (b) one-by-one / batched, pipeline     "
          f"{ratios['batched_speedup_pipeline']:.2f}x")
    ray_pool.shutdown()
    figures = {"model": model_dir, "population": args.population, "examples": args.examples,
               "prompt_length": args.prompt_length, "micro_batch": args.micro_batch, "repeats": args.repeats,
               "mean_input_tokens": float(lengths.mean()), "median_s": median, "ratios": ratios,
               "machine": machine(load_before)}
    print(json.dumps(figures))
    write_bench(args.output, figures)
    return figures


if __name__ == "__main__":
    main()
