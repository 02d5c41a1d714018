"""The BBT coordinator's overhead and replica scaling, measured side by side in one run (the machine
is shared; ratios, not times).

(a) BBT with the default config (popsize 20, d = 100, 10 prompt tokens, 16-shot) on the default
    large LM through the Ray pipeline (1 replica x 1 stage): the coordinator's own time per
    generation (ask, tell, bookkeeping, log and checkpoint writing, metrics: everything but waiting
    for the oracle) against the generation's oracle time, from the `coordinator_s` and `oracle_s`
    fields of the search's log (median over generations; the first, a warm-up, is left out);
(b) one population (the default config's first) scored over 2 replicas vs. 1 (the first replica of
    the same 2-replica pool alone), with SIMULATED API latency (`PoolSpec.simulated_latency_ms`:
    each replica's first stage sleeps that long per micro-batch, as a remote API adds a fixed
    delay per call) and small micro-batches so that latency dominates; then the same without
    latency (compute only, where the machine's cores are shared by both replicas and the driver).
    The answers of all four cases must be identical: the latency only sleeps.

    python bench/search.py [--model DIR] [--generations 10] [--latency-ms 50] [--repeats 3]
    python bench/search.py --quick          # a smoke run, under a minute

The figures go to --output (default results/bench/search.json), which `python -m raydapt.results`
renders into the README's Performance section.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from actors.cluster import init_ray
from actors.runner import RayRuntime
from raydapt.models.checkpoint import model_info
from raydapt.serving import PoolSpec
from raydapt.bbt.config import BBTConfig
from raydapt.bbt.inputs import EncodedTask, Split, encode_task, load_configured_task
from raydapt.bbt.job import build_space
from raydapt.bbt.search import PromptSearch
from raydapt.defaults import default_model_dir
from raydapt.oracle import ShardedOracle
from raydapt.outputs import read_jsonl
from raydapt.results import bench_output, machine, write_bench
from raydapt.search.optimizers import make_optimizer

FULL = {"generations": 10, "latency_ms": 50.0, "latency_micro_batch": 4, "latency_examples": 0, "repeats": 3}
QUICK = {"generations": 3, "latency_ms": 50.0, "latency_micro_batch": 4, "latency_examples": 8, "repeats": 2}


def encoded_task(cfg: BBTConfig, synthetic: bool) -> EncodedTask:
    """The default task as a BBT job encodes it, or random ids of its shape (a model without a
    tokenizer, such as the tests' tiny checkpoints)."""
    info = model_info(cfg.model)
    if not synthetic:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError):
            raise SystemExit(f"error: {cfg.model} has no tokenizer; pass --synthetic for random inputs")
        return encode_task(load_configured_task(cfg), tokenizer, cfg.prompt_length, cfg.mode, info.max_positions,
                           cfg.placeholder)
    rng = np.random.default_rng(cfg.seed)
    n, classes, most = 3 * cfg.k_shot, 3, min(info.max_positions, cfg.prompt_length + 40)

    def split() -> Split:
        lengths = rng.integers(cfg.prompt_length + 4, most + 1, n)
        ids = rng.integers(4, info.vocab_size, (n, most))
        ids[:, :cfg.prompt_length] = 3  # the placeholder slots
        ids[np.arange(most)[None, :] >= lengths[:, None]] = 0
        return Split(ids.astype(np.int64), lengths.astype(np.int64), rng.integers(0, classes, n).astype(np.int64))

    train, dev = split(), split()
    return EncodedTask(train, dev, dev, dev, label_ids=[1, 2, 3][:classes], prompt_offset=0)


def coordinator_overhead(cfg: BBTConfig, data: EncodedTask, generations: int) -> dict:
    """(a): a BBT search as the job runs it (Ray pool, metrics reporters), then its log's timings."""
    cfg = dataclasses.replace(cfg, budget=(generations + 1) * cfg.popsize)  # +1: the warm-up
    runtime = RayRuntime()
    pool = runtime.open_pool(PoolSpec(cfg.model, cfg.stages, cfg.replicas, cfg.cpus_per_stage, cfg.gpus_per_stage,
                                      strategy=cfg.placement))
    try:
        oracle = ShardedOracle(pool, cfg.micro_batch, reporter=runtime.oracle_reporter())
        with tempfile.TemporaryDirectory(prefix="raydapt-bench-") as out:
            search = PromptSearch(cfg, oracle, data, build_space(cfg, oracle, data), Path(out),
                                  progress=lambda line: None, reporter=runtime.search_reporter(cfg.method, cfg.budget, "bench"))
            state = search.run(search.fresh_state())
            rows = read_jsonl(Path(out) / "log.jsonl")
    finally:
        pool.shutdown()
    rows = rows[1:]  # the first generation pays for lazy initialisation and writes no checkpoint before it
    oracle_s = [r["oracle_s"] for r in rows]
    coordinator_s = [r["coordinator_s"] for r in rows]
    return {"generations": len(rows), "median_oracle_s": statistics.median(oracle_s),
            "median_coordinator_s": statistics.median(coordinator_s),
            "coordinator_over_oracle": statistics.median(c / o for c, o in zip(coordinator_s, oracle_s)),
            "coordinator_over_oracle_total": sum(coordinator_s) / sum(oracle_s),
            "search_oracle_s": state.oracle_s, "search_coordinator_s": state.coordinator_s,
            "per_generation": [{"generation": r["generation"], "oracle_s": r["oracle_s"],
                                "coordinator_s": r["coordinator_s"], "dev": "dev_accuracy" in r} for r in rows]}


def population(cfg: BBTConfig, data: EncodedTask, oracle) -> np.ndarray:
    """The default config's first population, as prompts (P, L, D)."""
    space = build_space(cfg, oracle, data)
    opt = make_optimizer(cfg.optimizer, cfg.intrinsic_dim, cfg.popsize, cfg.budget, seed=cfg.seed * 1009,
                         sigma=cfg.sigma)
    return space.project(np.asarray(opt.ask(), dtype=np.float64))


class FirstReplicas:
    """The first `n` replicas of a pool, as a pool: 1 and 2 replicas on the very same actors."""

    def __init__(self, pool, n: int):
        self.pool, self.n_replicas, self.info = pool, n, pool.info

    def put(self, value):
        return self.pool.put(value)

    def submit(self, replica: int, micro_batch: dict, prompts):
        return self.pool.submit(replica, micro_batch, prompts)

    def gather(self, handles: list) -> list:
        return self.pool.gather(handles)


def replica_scaling(cfg: BBTConfig, data: EncodedTask, latency_ms: float, micro_batch: int, examples: int,
                    repeats: int) -> dict:
    """(b): one population over 1 and 2 replicas, with simulated latency and without.

    One 2-replica pool per latency setting, scored through its first replica alone and through
    both: the same actors either way, so only the replica count differs. Each case is warmed up;
    then the two are timed in turn, `repeats` times."""
    n = examples or len(data.train.lengths)
    ids, lengths = data.train.input_ids[:n], data.train.lengths[:n]
    times, answers, prompts = {}, {}, None
    for latency in (latency_ms, 0.0):
        label = "latency" if latency else "no_latency"
        pool = RayRuntime().open_pool(PoolSpec(cfg.model, replicas=2, cpus_per_stage=cfg.cpus_per_stage,
                                               simulated_latency_ms=latency))
        try:
            oracles = {r: ShardedOracle(FirstReplicas(pool, r), micro_batch) for r in (1, 2)}
            if prompts is None:
                prompts = population(cfg, data, oracles[2])

            def request(r):
                return oracles[r].label_logits(ids, lengths, data.label_ids, prompts, cfg.mode, data.prompt_offset)

            for r in oracles:  # warm-up: first calls pay for lazy initialisation
                answers[f"{label}_r{r}"] = request(r)
            timed = {r: [] for r in oracles}
            for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
                for r in oracles:
                    began = time.perf_counter()
                    request(r)
                    timed[r].append(time.perf_counter() - began)
            times |= {f"{label}_r{r}": statistics.median(t) for r, t in timed.items()}
        finally:
            pool.shutdown()
    reference = answers["latency_r1"]
    rows = len(prompts) * n
    return {"latency_ms": latency_ms, "micro_batch": micro_batch, "population": len(prompts), "examples": n,
            "micro_batches": -(-rows // micro_batch), "repeats": repeats, "median_s": times,
            "speedup_latency": times["latency_r1"] / times["latency_r2"],
            "speedup_no_latency": times["no_latency_r1"] / times["no_latency_r2"],
            "identical": all(np.array_equal(reference, a) for a in answers.values())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the built large LM)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random token ids of the default task's shape (for a model without a tokenizer)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run under a minute: {QUICK}")
    parser.add_argument("--generations", type=int, default=None,
                        help=f"(a) generations measured, after one warm-up (default {FULL['generations']})")
    parser.add_argument("--micro-batch", type=int, default=BBTConfig.micro_batch, help="(a) rows per micro-batch")
    parser.add_argument("--latency-ms", type=float, default=None,
                        help=f"(b) simulated API latency per micro-batch (default {FULL['latency_ms']})")
    parser.add_argument("--latency-micro-batch", type=int, default=None,
                        help=f"(b) rows per micro-batch (default {FULL['latency_micro_batch']})")
    parser.add_argument("--latency-examples", type=int, default=None,
                        help="(b) train examples scored (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help=f"(b) timed repeats (default {FULL['repeats']})")
    parser.add_argument("--output", type=Path, default=bench_output("search"),
                        help="where the figures are written as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in FULL}
    if sizes["generations"] < 1 or sizes["repeats"] < 1 or sizes["latency_micro_batch"] < 1 or sizes["latency_ms"] < 0:
        parser.error("--generations, --repeats and --latency-micro-batch must be >= 1, --latency-ms >= 0")

    load_before = os.getloadavg()
    model_dir = args.model or str(default_model_dir("large"))
    cfg = BBTConfig(model=model_dir, micro_batch=args.micro_batch, log_every=10**9)  # the default BBT config otherwise
    data = encoded_task(cfg, args.synthetic)

    import ray
    started_ray = not ray.is_initialized()
    init_ray(num_cpus=max(os.cpu_count() or 1, 3))  # 2 replicas + the driver
    try:
        a = coordinator_overhead(cfg, data, sizes["generations"])
        b = replica_scaling(cfg, data, sizes["latency_ms"], sizes["latency_micro_batch"], sizes["latency_examples"],
                            sizes["repeats"])
    finally:
        if started_ray:
            ray.shutdown()

    ratios = {"coordinator_over_oracle": a["coordinator_over_oracle"],
              "speedup_2_replicas_simulated_latency": b["speedup_latency"],
              "speedup_2_replicas_no_latency": b["speedup_no_latency"]}
    print(f"model {model_dir} ({'synthetic inputs' if args.synthetic else 'default task'}): BBT popsize "
          f"{cfg.popsize}, d {cfg.intrinsic_dim}, prompt {cfg.prompt_length} tokens, "
          f"{len(data.train.lengths)} train examples, micro-batch {cfg.micro_batch}")
    print(f"  (a) 1x1 Ray pipeline, median of {a['generations']} generations: oracle "
          f"{a['median_oracle_s'] * 1000:.1f} ms, coordinator {a['median_coordinator_s'] * 1000:.2f} ms")
    print(f"  (a) coordinator / oracle per generation   {a['coordinator_over_oracle']:.2%}  (goal < 5%)")
    m = b["median_s"]
    print(f"  (b) {b['population']} prompts x {b['examples']} examples, micro-batch {b['micro_batch']} "
          f"({b['micro_batches']} micro-batches), median of {b['repeats']} repeats")
    print(f"  (b) SIMULATED latency {b['latency_ms']:g} ms/micro-batch: 1 replica {m['latency_r1'] * 1000:.0f} ms, "
          f"2 replicas {m['latency_r2'] * 1000:.0f} ms -> {b['speedup_latency']:.2f}x  (goal >= 1.6x)")
    print(f"  (b) no latency (compute only):  1 replica {m['no_latency_r1'] * 1000:.0f} ms, "
          f"2 replicas {m['no_latency_r2'] * 1000:.0f} ms -> {b['speedup_no_latency']:.2f}x")
    print(f"  (b) answers identical over replicas and latency: {b['identical']}")
    figures = {"model": model_dir, "synthetic": args.synthetic, "sizes": sizes,
               "bbt": {"popsize": cfg.popsize, "intrinsic_dim": cfg.intrinsic_dim, "prompt_length": cfg.prompt_length,
                       "train_examples": len(data.train.lengths), "micro_batch": cfg.micro_batch},
               "coordinator": a,
               "replicas": b, "ratios": ratios, "quick": args.quick, "machine": machine(load_before)}
    print(json.dumps(figures))
    write_bench(args.output, figures)
    return figures


if __name__ == "__main__":
    main()
