"""Extending the frozen LM (jobs/extend.py's methods) measured side by side in one run: trainable
parameters and peak training memory per method, and the tokens per second of a training step with
1 and 2 Ray Train workers (the machine is shared; ratios, not times).

A step is jobs/extend.py's (actors/extend_trainer.py): the extension loss (LM loss on every token +
alpha x the method's auxiliary term), backward, gradient clipping, AdamW, on a global batch of
`--batch` blocks of `--context` tokens. Tokens are random ids of the backbone's vocabulary, one row
in 8 marked original-domain: a step's time depends on the shapes, not on the values. 1 and 2
workers are timed in one Ray Train run of 2 workers (1 CPU and 1 torch thread each), step by step
in turn: rank 0 alone runs the whole batch on a plain model (what a 1-worker run does: no DDP)
while rank 1 waits at a barrier, then both run half the batch each (rows rank::2) under DDP, which
averages the gradients of what trains. Alternating cancels the drift of a shared machine's load,
and one Ray Train start-up (tens of seconds here) serves both.

Memory is counted, not sampled. On CPU tracemalloc does not see torch's allocations, and a peak-RSS
delta mixes the step with glibc's caching of freed pages and the libraries' lazy set-up (hundreds of
MB of torch and transformers), so it changes with what the process did before. So one step of each
method runs in this process, and what it holds at its fullest is
added up from the tensors themselves: the weights (every parameter, the frozen backbone included),
the gradients of what trains, AdamW's state after the step (read from the optimizer, not assumed),
and the activations autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`, each
storage counted once, parameters excluded). This is what an accelerator would have to hold, the
activations at their peak (the end of forward) and the gradients with them; it leaves out the
short-lived buffers inside an op. It shows what each method must keep: LoRA and the adapters save
activations through every block after the first one that trains, full fine-tuning also keeps
gradients and two AdamW moments of every weight.

    python bench/extend.py [--model DIR] [--batch 16] [--context 128] [--steps 8] [--warmup 2]
    python bench/extend.py --quick          # a smoke run: tiny sizes, neutral only on Ray Train

The figures go to --output (default results/bench/extend.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raydapt.adapters.config import METHODS
from raydapt.results import bench_output, machine, write_bench

FULL = {"batch": 16, "context": 128, "steps": 8, "warmup": 2}
QUICK = {"batch": 4, "context": 16, "steps": 2, "warmup": 1}
SPEED_METHODS = ("neutral", "adapter", "lora", "full")  # the ablations train neutral's tensors
ORIGINAL_EVERY = 8  # one row in 8 is original-domain (the l1 term's tokens); jobs/extend.py mixes 10 %


def batches(steps: int, batch: int, context: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (steps, batch, context) and the original-domain mark per row (batch,)."""
    ids = np.random.default_rng(seed).integers(0, vocab, (steps, batch, context), dtype=np.int64)
    return ids, np.arange(batch) % ORIGINAL_EVERY == 0


def _extended(model_dir: str, method: str, seed: int = 0):
    """The backbone extended by `method` as a Ray Train worker of jobs/extend.py builds it; (model, the
    sized adapter config)."""
    from raydapt.adapters import AdapterConfig
    from raydapt.extend.step import extended_model

    return extended_model(model_dir, AdapterConfig(method=method), seed)


def saved_bytes(forward, exclude: set[int]) -> tuple[object, int]:
    """(forward(), the bytes of the tensors autograd saved for backward during it), each storage
    once, storages whose data_ptr is in `exclude` (the parameters) left out."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(saved.values())


def training_memory(model_dir: str, method: str, ids: np.ndarray, original: np.ndarray) -> dict:
    """Bytes one training step holds at its fullest, by kind (see the module doc), and the counts."""
    from raydapt.adapters import extension_loss
    from raydapt.adapters.attach import backbone_parameters

    torch.set_num_threads(1)
    model, adapter = _extended(model_dir, method)
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}  # tied weights once
    trainable = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    x = torch.from_numpy(ids)
    mask = torch.from_numpy(original)[:, None].expand_as(x)
    out, activations = saved_bytes(lambda: extension_loss(model, x, mask, adapter), set(params))
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    memory = {"weights": nbytes(params.values()), "gradients": nbytes(p.grad for p in trainable),
              "optimizer": nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
              "activations": activations}
    memory["total"] = sum(memory.values())
    n_trainable = sum(p.numel() for p in trainable)
    backbone = backbone_parameters(model) - (n_trainable if method not in ("full",) else 0)
    return {"trainable_parameters": n_trainable, "backbone_parameters": backbone,
            "trainable_fraction": n_trainable / backbone, "memory_bytes": memory}


def train_loop(config: dict) -> None:
    """A worker of a 2-worker Ray Train group. Per method and step, alternately: rank 0 alone runs the
    whole batch on a plain model (what a 1-worker run does: no DDP) while rank 1 waits, then both run
    rows rank::2 under DDP. Reports rank 0's timed seconds {method: {"1": [...], "2": [...]}}."""
    import ray.train
    import ray.train.torch

    from raydapt.extend.step import optimizer, training_step

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ids, original = batches(config["warmup"] + config["steps"], config["batch"], config["context"], config["vocab"])
    ids, original = torch.from_numpy(ids), torch.from_numpy(original)

    times = {}
    for method in config["methods"]:
        pair, adapter = _extended(config["model_dir"], method, config["seed"])
        pair_params, pair_opt = optimizer(pair, 1e-4)
        ddp = ray.train.torch.prepare_model(pair, move_to_device=False)  # wraps in DDP: world is 2
        if rank == 0:
            solo, _ = _extended(config["model_dir"], method, config["seed"])
            solo_params, solo_opt = optimizer(solo, 1e-4)
        times[method] = {"1": [], "2": []}
        for step in range(len(ids)):
            timed = step >= config["warmup"]
            torch.distributed.barrier()
            if rank == 0:
                began = time.perf_counter()
                training_step(solo, solo_params, solo_opt, adapter, ids[step], original[:, None].expand_as(ids[step]))
                if timed:
                    times[method]["1"].append(time.perf_counter() - began)
            torch.distributed.barrier()  # rank 1 waited (blocked, not spinning) for the solo step
            began = time.perf_counter()
            x = ids[step, rank::world]
            training_step(ddp, pair_params, pair_opt, adapter, x, original[rank::world][:, None].expand_as(x))
            if timed:
                times[method]["2"].append(time.perf_counter() - began)
        del ddp, pair, pair_opt
        if rank == 0:
            del solo, solo_opt
    if rank == 0:  # Ray Train keeps what a checkpoint carries: rank 0's times travel in one
        with tempfile.TemporaryDirectory(prefix="bench-extend-") as d:
            Path(d, "times.json").write_text(json.dumps(times))
            ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"rank": rank})


def step_times(model_dir: str, methods: list[str], sizes: dict, vocab: int, storage: str) -> dict:
    """{method: {"1": [seconds per timed step], "2": [...]}} from one Ray Train run of 2 workers."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"model_dir": model_dir, "methods": methods, "vocab": vocab, "seed": 0, "threads": 1,
              **{k: sizes[k] for k in ("batch", "context", "steps", "warmup")}}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-extend-{time.time_ns()}", storage_path=storage,
                             logging_config=LoggingConfig(log_level="WARNING")))
    with trainer.fit().checkpoint.as_directory() as d:
        return json.loads(Path(d, "times.json").read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the built large LM)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}, {SPEED_METHODS[0]} only on Ray")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods whose parameters and memory are counted")
    parser.add_argument("--speed-methods", default=None,
                        help=f"methods timed on 1 and 2 workers (default {','.join(SPEED_METHODS)})")
    for name in FULL:
        parser.add_argument(f"--{name}", type=int, default=None, help=f"(default {FULL[name]}, quick {QUICK[name]})")
    parser.add_argument("--output", type=Path, default=bench_output("extend"),
                        help="where the figures are written as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in FULL}
    if min(sizes["batch"], sizes["context"], sizes["steps"]) < 1 or sizes["warmup"] < 0:
        parser.error("--batch, --context and --steps must be >= 1, --warmup >= 0")
    if sizes["batch"] % 2:
        parser.error(f"--batch {sizes['batch']}: must be even, so that 2 workers split it")
    methods = args.methods.split(",")
    speed = (args.speed_methods or (SPEED_METHODS[0] if args.quick else ",".join(SPEED_METHODS))).split(",")
    unknown = sorted(set(methods + speed) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; accepted: {', '.join(METHODS)}")

    from raydapt.defaults import default_model_dir
    from raydapt.models.checkpoint import model_info

    load_before = os.getloadavg()
    model_dir = str(Path(args.model or default_model_dir("large")).resolve())
    info = model_info(model_dir)
    if sizes["context"] > info.max_positions:
        parser.error(f"--context {sizes['context']} exceeds the model's context of {info.max_positions}")

    began = time.perf_counter()
    ids, original = batches(1, sizes["batch"], sizes["context"], info.vocab_size)
    counted = {m: training_memory(model_dir, m, ids[0], original) for m in methods}
    full_total = counted["full"]["memory_bytes"]["total"] if "full" in counted else None
    for c in counted.values():
        c["memory_over_full"] = c["memory_bytes"]["total"] / full_total if full_total else None

    wall = {"memory_s": time.perf_counter() - began}
    import ray

    from actors.cluster import init_ray
    started_ray = not ray.is_initialized()
    init_ray(num_cpus=max(os.cpu_count() or 1, 2))
    try:
        with tempfile.TemporaryDirectory(prefix="raydapt-bench-extend-") as storage:
            began = time.perf_counter()
            runs = step_times(model_dir, speed, sizes, info.vocab_size, storage)
            wall["train_run_s"] = time.perf_counter() - began
    finally:
        if started_ray:
            ray.shutdown()

    tokens = sizes["batch"] * sizes["context"]
    timed = {}
    for m in speed:
        median = {w: statistics.median(runs[m][w]) for w in ("1", "2")}
        timed[m] = {"median_step_s": median, "tokens_per_s": {w: tokens / median[w] for w in median},
                    "speedup_2_workers": median["1"] / median["2"], "step_times_s": runs[m]}
    figures = {"bench": "extend", "model": model_dir, "quick": args.quick, "sizes": sizes,
               "tokens_per_step": tokens, "threads_per_worker": 1,
               "speed_method": "one Ray Train run of 2 workers; per step, alternately, rank 0 alone on the whole "
                               "batch without DDP (1 worker) and both on half each under DDP (2 workers)",
               "backbone_parameters": next(iter(counted.values()))["backbone_parameters"],
               "memory_method": "counted: weights + gradients + AdamW state + autograd-saved activations of one step "
                                "at the full batch (saved_tensors_hooks, storages once, parameters excluded)",
               "methods": counted, "speed": timed, "wall_s": {k: round(v, 2) for k, v in wall.items()},
               "machine": machine(load_before)}
    _print(figures)
    print(json.dumps(figures))
    write_bench(args.output, figures)
    return figures


def _print(fig: dict) -> None:
    n = fig["sizes"]
    print(f"model {fig['model']}: {fig['backbone_parameters']:,} backbone parameters; a step = {n['batch']} blocks x "
          f"{n['context']} tokens")
    print(f"  {'method':16s} {'trainable':>12s} {'of backbone':>11s} {'memory MiB':>10s} {'/ full':>7s}  "
          "(weights, grads, AdamW, activations MiB)")
    for m, c in fig["methods"].items():
        b = c["memory_bytes"]
        over = f"{c['memory_over_full']:.2f}" if c["memory_over_full"] else "-"
        parts = ", ".join(f"{b[k] / 2**20:.1f}" for k in ("weights", "gradients", "optimizer", "activations"))
        print(f"  {m:16s} {c['trainable_parameters']:12,d} {c['trainable_fraction']:11.1%} "
              f"{b['total'] / 2**20:10.1f} {over:>7s}  ({parts})")
    for m, s in fig["speed"].items():
        t = s["tokens_per_s"]
        print(f"  {m:16s} {t['1']:8.0f} tokens/s on 1 worker, {t['2']:8.0f} on 2: {s['speedup_2_workers']:.2f}x")


if __name__ == "__main__":
    main()
