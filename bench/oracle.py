"""Oracle throughput against this machine's limit, measured side by side in one run (the machine is
shared: ratios and fractions measured together, not absolute times).

limit: this machine's fp32 matmul peak at the model's own shapes (torch.matmul, timed in this run),
    then, at prompt lengths L = 10 and 50, a population of P prompts on N examples: batched with
    the prompt prefix shared (each candidate's prefix run once), batched without sharing, and one
    candidate per request (BBT's reference code: a forward of the whole train set per candidate,
    no sharing), in process and through the 2-stage Ray pipeline. Each case's FLOPs are counted on
    the real tokens it computes (attention included, padding not) and its achieved FLOP/s is given
    as a fraction of the peak of the threads it runs on (1 in process, 1 per stage actor).
scaling: time per request as P, N, L and S each double from the default request, as ratios to it
    (through Ray stage actors, prefix sharing on).

    python bench/oracle.py [--model DIR] [--population 20] [--examples 32] [--prompt-lengths 10,50]
                           [--repeats 3] [--only limit|scaling] [--quick] [--output FILE.json]

The figures go to --output (default results/bench/oracle.json), which `python -m raydapt.results`
renders into the README's Performance section.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from actors.cluster import init_ray
from actors.pipeline import LocalPool, RayPool
from raydapt.defaults import default_model_dir
from raydapt.models.checkpoint import model_info
from raydapt.models.shard import load_shard
from raydapt.oracle import ShardedOracle, sharing_plan
from raydapt.results import bench_output, machine, write_bench
from raydapt.serving import PoolSpec

FULL = {"population": 20, "examples": 32, "prompt_lengths": [10, 50], "repeats": 3}
QUICK = {"population": 4, "examples": 6, "prompt_lengths": [3, 6], "repeats": 1}
PLACEHOLDER = 1  # token id of the prompt slots in --synthetic inputs


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --- inputs ---------------------------------------------------------------------------------------
def inputs(model_dir: str, n_examples: int, prompt_length: int, synthetic: bool, vocab: int):
    """(ids (N, T), lengths (N,), label ids): L placeholder slots, then the text (BBT's add mode)."""
    if synthetic:
        rng = np.random.default_rng(0)
        lengths = rng.integers(8, 40, n_examples) + prompt_length
        ids = rng.integers(2, vocab, (n_examples, int(lengths.max())))
        ids[:, :prompt_length] = PLACEHOLDER
        return ids, lengths, [2, 3]
    from transformers import AutoTokenizer
    from raydapt.data.tasks import default_task, encode_examples, label_token_ids
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = default_task(seed=0)
    ids, lengths = encode_examples(tokenizer, task.test["text"][:n_examples], task.template, prompt_length,
                                   placeholder_id=tokenizer.pad_token_id)
    return ids, lengths, label_token_ids(tokenizer, task.verbalizer)


# --- FLOPs ----------------------------------------------------------------------------------------
def model_costs(model_dir: str) -> dict:
    """Per block: matmul weights (each (K, N) shape, FLOPs per token = 2 K N), the attention width
    (heads x head dim), the layer count, and the LM head's shape (run once per row, at its answer)."""
    config = AutoConfig.from_pretrained(model_dir)
    shard = load_shard(model_dir, 1, 0)
    shapes = []
    for module in shard.blocks[0].modules():
        weight = getattr(module, "weight", None)
        if weight is not None and weight.ndim == 2:
            k, n = (weight.shape[1], weight.shape[0]) if isinstance(module, torch.nn.Linear) else weight.shape
            shapes.append((int(k), int(n)))  # GPT-2's Conv1D stores (in, out)
    head = shard.modules_by_path[shard.family.head].weight
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {"shapes": shapes, "attention_width": int(width), "layers": shard.n_layers,
            "head": (int(head.shape[1]), int(head.shape[0]))}


def position_flops(costs: dict, start: int, stop: int) -> float:
    """FLOPs of positions start..stop-1 of one sequence through every block: the matmuls, and
    attention's QK^T and AV over the t + 1 keys position t sees."""
    n = stop - start
    if n <= 0:
        return 0.0
    linear = 2 * sum(k * m for k, m in costs["shapes"]) * n
    keys = (start + 1 + stop) * n / 2  # sum of t + 1 over t in [start, stop)
    return costs["layers"] * (linear + 4 * costs["attention_width"] * keys)


def request_flops(costs: dict, ids, lengths, n_prompts: int, prompt_length: int, micro_batch: int,
                  shared: bool) -> float:
    """FLOPs on the real tokens of one add-mode request (P prompts x N rows), as the oracle cuts it."""
    head = 2 * costs["head"][0] * costs["head"][1] * n_prompts * len(lengths)
    plan = sharing_plan(ids, lengths, n_prompts, prompt_length, "add", 0, micro_batch) if shared else None
    if plan is None:
        return head + n_prompts * sum(position_flops(costs, 0, int(n)) for n in lengths)
    tiles = -(-len(lengths) // plan["examples"])  # each tile of examples runs each candidate's prefix once
    prefix = tiles * n_prompts * position_flops(costs, 0, plan["prefix"])
    rows = n_prompts * sum(position_flops(costs, plan["prefix"], plan["prefix"] + int(n) - plan["split"])
                           for n in lengths)
    return head + prefix + rows


def matmul_peak(costs: dict, rows: int, repeats: int = 20) -> dict:
    """Best fp32 torch.matmul FLOP/s over the model's weight shapes with `rows` tokens, on this
    process's torch threads."""
    per_shape = []
    for k, n in sorted(set(costs["shapes"]) | {costs["head"]}):
        x, w = torch.randn(rows, k), torch.randn(k, n)
        for _ in range(3):
            torch.matmul(x, w)
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            torch.matmul(x, w)
            best = min(best, time.perf_counter() - began)
        per_shape.append({"m": rows, "k": k, "n": n, "flops_per_s": 2 * rows * k * n / best})
    return {"flops_per_s": max(s["flops_per_s"] for s in per_shape), "threads": torch.get_num_threads(),
            "shapes": per_shape}


# --- timing ---------------------------------------------------------------------------------------
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cases: dict, repeats: int) -> dict:
    """Median seconds per case; a warm-up first, then repeats interleaved so that drift in the
    machine's load hits every case alike."""
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def limit_section(args, model_dir, costs, peak, pools, embed_dim, vocab) -> dict:
    out = {}
    for length in args.prompt_lengths:
        ids, lengths, label_ids = inputs(model_dir, args.examples, length, args.synthetic, vocab)
        prompts = np.random.default_rng(0).normal(0, 0.02, (args.population, length, embed_dim)).astype(np.float32)
        cases, flops = {}, {}
        for where, pool in pools.items():
            shared = ShardedOracle(pool, args.micro_batch, prefix_sharing=True)
            unshared = ShardedOracle(pool, args.micro_batch, prefix_sharing=False)
            cases[f"{where}_shared"] = lambda o=shared: o.label_logits(ids, lengths, label_ids, prompts)
            cases[f"{where}_unshared"] = lambda o=unshared: o.label_logits(ids, lengths, label_ids, prompts)
            cases[f"{where}_one_by_one"] = lambda o=unshared: [  # BBT's reference: one candidate per call
                o.label_logits(ids, lengths, label_ids, prompts[p:p + 1]) for p in range(len(prompts))]
            flops[f"{where}_shared"] = request_flops(costs, ids, lengths, len(prompts), length, args.micro_batch, True)
            flops[f"{where}_unshared"] = flops[f"{where}_one_by_one"] = request_flops(
                costs, ids, lengths, len(prompts), length, args.micro_batch, False)
        median = measure(cases, args.repeats)
        workers = {"in_process": 1, "pipeline": 2}  # threads at work: 1 in process, 1 per stage actor
        rows = {}
        for name in cases:
            limit = workers["pipeline" if name.startswith("pipeline") else "in_process"] * peak["flops_per_s"]
            rows[name] = {"median_s": median[name], "flops": flops[name], "flops_per_s": flops[name] / median[name],
                          "fraction_of_peak": flops[name] / median[name] / limit}
        ratios = {}
        for where in pools:
            ratios[f"one_by_one_over_shared_{where}"] = median[f"{where}_one_by_one"] / median[f"{where}_shared"]
            ratios[f"one_by_one_over_unshared_{where}"] = median[f"{where}_one_by_one"] / median[f"{where}_unshared"]
            ratios[f"unshared_over_shared_{where}"] = median[f"{where}_unshared"] / median[f"{where}_shared"]
        ratios["pipeline_over_in_process_shared"] = median["pipeline_shared"] / median["in_process_shared"]
        plan = sharing_plan(ids, lengths, len(prompts), length, "add", 0, args.micro_batch)
        out[str(length)] = {"cases": rows, "ratios": ratios, "mean_input_tokens": float(lengths.mean()),
                            "shared_work_fraction": flops["in_process_shared"] / flops["in_process_unshared"],
                            "tile": {"examples": plan["examples"], "candidates": plan["candidates"]}}
        print(f"L = {length}: population {args.population} x {args.examples} examples, mean input "
              f"{lengths.mean():.1f} tokens; shared prefix leaves {out[str(length)]['shared_work_fraction']:.2f} "
              f"of the unshared FLOPs (tiles of {plan['candidates']} candidates x {plan['examples']} examples)")
        for name, row in rows.items():
            print(f"  {name:24s} {row['median_s'] * 1000:9.1f} ms  {row['flops'] / 1e9:7.2f} GFLOP  "
                  f"{row['flops_per_s'] / 1e9:6.2f} GFLOP/s  {row['fraction_of_peak']:6.1%} of peak")
        for name, value in ratios.items():
            print(f"  {name:38s} {value:.2f}x")
    return out


def scaling_section(args, model_dir, embed_dim, vocab) -> dict:
    """Time per request as P, N, L, S each double from the default, through Ray stage actors."""
    base = {"population": args.population, "examples": args.examples, "prompt_length": args.prompt_lengths[0],
            "stages": 1}
    variants = {"default": base} | {f"{k}_x2": base | {k: 2 * base[k]} for k in base}
    pools = {s: RayPool(PoolSpec(model_dir, stages=s, cpus_per_stage=0.5)) for s in (1, 2)}
    try:
        cases = {}
        for name, v in variants.items():
            ids, lengths, label_ids = inputs(model_dir, v["examples"], v["prompt_length"], args.synthetic, vocab)
            prompts = np.random.default_rng(1).normal(0, 0.02, (v["population"], v["prompt_length"], embed_dim))
            oracle = ShardedOracle(pools[v["stages"]], args.micro_batch)
            cases[name] = lambda o=oracle, a=(ids, lengths, label_ids, prompts.astype(np.float32)): o.label_logits(*a)
        median = measure(cases, args.repeats)
    finally:
        for pool in pools.values():
            pool.shutdown()
    rows = {name: {**variants[name], "median_s": median[name], "ratio": median[name] / median["default"]}
            for name in variants}
    print("scaling (Ray stage actors, prefix sharing on), time per request / the default request:")
    for name, row in rows.items():
        print(f"  {name:18s} P={row['population']:3d} N={row['examples']:3d} L={row['prompt_length']:3d} "
              f"S={row['stages']}  {row['median_s'] * 1000:9.1f} ms  {row['ratio']:.2f}x")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the built large LM)")
    parser.add_argument("--synthetic", action="store_true", help="random token ids (a checkpoint without tokenizer)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--population", type=int, default=None, help=f"P (default {FULL['population']})")
    parser.add_argument("--examples", type=int, default=None, help=f"N (default {FULL['examples']})")
    parser.add_argument("--prompt-lengths", default=None,
                        help=f"comma-separated L (default {','.join(map(str, FULL['prompt_lengths']))}); "
                             "the first is the scaling table's default")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None, help=f"timed repeats (default {FULL['repeats']})")
    parser.add_argument("--only", choices=("limit", "scaling"), default=None, help="run one section")
    parser.add_argument("--output", type=Path, default=bench_output("oracle"),
                        help="where the figures are written as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("population", "examples", "repeats"):
        setattr(args, key, getattr(args, key) or preset[key])
    args.prompt_lengths = ([int(x) for x in args.prompt_lengths.split(",")] if args.prompt_lengths
                           else preset["prompt_lengths"])
    if min(args.population, args.examples, args.micro_batch, args.repeats, *args.prompt_lengths) < 1:
        parser.error("--population, --examples, --prompt-lengths, --micro-batch and --repeats must be >= 1")
    load_before, uptime_before = os.getloadavg(), uptime()
    print(f"machine: {uptime_before}")
    model_dir = args.model or str(default_model_dir("large"))
    info = model_info(model_dir)  # (a LocalPool here would pin this process to 1 torch thread)
    costs = model_costs(model_dir)
    figures = {"model": model_dir, "population": args.population, "examples": args.examples,
               "prompt_lengths": args.prompt_lengths, "micro_batch": args.micro_batch, "repeats": args.repeats,
               "quick": args.quick, "synthetic": args.synthetic}
    init_ray(num_cpus=max(4, os.cpu_count() or 1))  # logical CPUs: the stages take turns on the cores
    if args.only in (None, "limit"):
        # Peak at the tokens of one micro-batch of the default request's rows (real positions).
        rows = args.micro_batch * (args.prompt_lengths[0] + 20)
        # One torch thread per worker, in process as in each stage actor: on a shared machine two threads
        # wait on each other far longer than they compute, and a small op (the shared path has more)
        # pays that wait each time. The limit of W workers is W x the one-thread peak.
        threads = torch.get_num_threads()
        peak = {"all_threads_flops_per_s": matmul_peak(costs, rows)["flops_per_s"], "all_threads": threads}
        torch.set_num_threads(1)
        peak |= matmul_peak(costs, rows)
        print(f"fp32 matmul peak at the model's shapes ({rows} rows): {peak['flops_per_s'] / 1e9:.2f} GFLOP/s on "
              f"1 torch thread, {peak['all_threads_flops_per_s'] / 1e9:.2f} on {threads}")
        pools = {"in_process": LocalPool(PoolSpec(model_dir, threads=1)),
                 "pipeline": RayPool(PoolSpec(model_dir, stages=2, cpus_per_stage=1))}
        try:
            figures["peak"] = peak
            figures["limit"] = limit_section(args, model_dir, costs, peak, pools, info.embed_dim, info.vocab_size)
        finally:
            pools["pipeline"].shutdown()
        figures["peak_after"] = matmul_peak(costs, rows)["flops_per_s"]  # 1 thread; the load may have moved
    if args.only in (None, "scaling"):
        figures["scaling"] = scaling_section(args, model_dir, info.embed_dim, info.vocab_size)
    figures["uptime_before"], figures["uptime_after"] = uptime_before, uptime()
    figures["machine"] = machine(load_before)
    print(f"machine: {figures['uptime_after']}")
    print(json.dumps(figures))
    write_bench(args.output, figures)
    return figures


if __name__ == "__main__":
    main()
