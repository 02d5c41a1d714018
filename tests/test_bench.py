"""bench/search.py and the simulated API latency it measures replicas with."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from actors.pipeline import LocalPool
from raydapt.serving import PoolSpec
from raydapt.errors import UserError
from raydapt.oracle import ShardedOracle

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(directory, latency_ms: float):
    rng = np.random.default_rng(0)
    ids, lengths = rng.integers(1, 128, (6, 12)), np.full(6, 12)
    prompts = rng.normal(0, 0.02, (2, 3, 32)).astype(np.float32)
    oracle = ShardedOracle(LocalPool(PoolSpec(str(directory), stages=2, simulated_latency_ms=latency_ms)), 4)
    began = time.perf_counter()
    out = oracle.label_logits(ids, lengths, [1, 2], prompts)
    return out, time.perf_counter() - began


def test_simulated_latency_only_sleeps(tiny_checkpoints):
    directory = tiny_checkpoints["llama"][0]
    plain, _ = request(directory, 0.0)
    slowed, seconds = request(directory, 30.0)
    assert np.array_equal(plain, slowed)
    assert seconds >= 3 * 0.030  # 2 prompts x 6 rows in micro-batches of 4: 3 sleeps, the first stage only
    with pytest.raises(UserError, match="latency"):
        PoolSpec(str(directory), simulated_latency_ms=-1.0).validate()


@pytest.mark.cluster
@pytest.mark.slow
def test_bench_search_quick_prints_its_ratios(tiny_checkpoints, ray_cluster, capsys, tmp_path):
    directory = tiny_checkpoints["llama"][0]
    output = tmp_path / "figures" / "search.json"
    figures = load_bench("search").main(["--quick", "--synthetic", "--model", str(directory), "--output", str(output)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"wrote {output}"
    printed = json.loads(lines[-2])
    assert json.loads(output.read_text()) == json.loads(json.dumps(figures))  # the file holds what was printed
    assert figures["machine"]["cpus"] >= 1 and figures["quick"] is True
    assert printed["ratios"] == figures["ratios"]
    ratios = printed["ratios"]
    assert set(ratios) == {"coordinator_over_oracle", "speedup_2_replicas_simulated_latency",
                           "speedup_2_replicas_no_latency"}
    assert all(np.isfinite(v) and v > 0 for v in ratios.values())
    assert printed["coordinator"]["generations"] == 3
    assert printed["replicas"]["identical"]  # the latency only sleeps; replicas change nothing
    # Sleeps on two replicas overlap: a loose bound, the machine is shared (the goal, 1.6x, is the bench's).
    assert ratios["speedup_2_replicas_simulated_latency"] > 1.2
    assert ray_cluster.is_initialized()  # the bench leaves a Ray it did not start running


@pytest.mark.cluster
@pytest.mark.slow
def test_bench_graybox_quick_prints_its_ratios(tiny_checkpoints, ray_cluster, capsys, tmp_path):
    directory = tiny_checkpoints["llama"][0]
    output = tmp_path / "figures" / "graybox.json"
    figures = load_bench("graybox").main(["--quick", "--synthetic", "--model", str(directory), "--output", str(output)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"wrote {output}"
    printed = json.loads(lines[-2])
    assert json.loads(output.read_text()) == json.loads(json.dumps(figures))  # the file holds what was printed
    assert printed == json.loads(json.dumps(figures))
    assert figures["machine"]["cpus"] >= 1 and figures["quick"] is True
    ratios = printed["ratios"]
    assert set(ratios) == {"pipeline_vs_in_process", "pipeline_vs_in_process_1_thread", "speedup_2_replicas",
                          "recompute_over_keep"}
    assert all(np.isfinite(v) and v > 0 for v in ratios.values())
    assert set(printed["median_s"]) == {"in_process", "in_process_1_thread", "pipeline_keep", "pipeline_recompute",
                                       "replicas_1", "replicas_2"}
    assert printed["identical"] is True  # the prompt's gradient: bitwise the same over S, R and recompute
    assert printed["kept_graphs_after"] == [[[0]], [[0, 0]], [[0], [0]]]  # every graph released by backward
    assert ray_cluster.is_initialized()  # the bench leaves a Ray it did not start running


def test_bench_oracle_counts_flops_by_hand(tiny_checkpoints):
    bench = load_bench("oracle")
    directory = str(tiny_checkpoints["llama"][0])
    costs = bench.model_costs(directory)
    # Tiny llama: q, o (32 -> 32), k, v (32 -> 16: 2 of 4 heads' keys), gate, up (32 -> 64), down (64 -> 32).
    assert sorted(costs["shapes"]) == sorted([(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert costs["attention_width"] == 32 and costs["layers"] == 4 and costs["head"] == (32, 128)
    # Positions 0, 1, 2: 3 tokens of 2 * 9216 matmul FLOPs, and QK^T + AV over 1 + 2 + 3 keys, in 4 blocks.
    assert bench.position_flops(costs, 0, 3) == 4 * (3 * 2 * 9216 + 4 * 32 * 6)
    assert bench.position_flops(costs, 0, 5) == bench.position_flops(costs, 0, 2) + bench.position_flops(costs, 2, 5)
    ids, lengths = np.full((4, 20), 7), np.array([20, 18, 16, 20])  # 12 shared tokens, then distinct text
    ids[:, 12:] = np.arange(32).reshape(4, 8)
    head = 2 * 32 * 128 * 3 * 4
    unshared = bench.request_flops(costs, ids, lengths, 3, 4, 8, shared=False)
    assert unshared == head + 3 * sum(bench.position_flops(costs, 0, int(n)) for n in lengths)
    shared = bench.request_flops(costs, ids, lengths, 3, 4, 8, shared=True)
    assert head < shared < 0.7 * unshared


@pytest.mark.cluster
@pytest.mark.slow
def test_bench_oracle_quick_prints_its_figures(tiny_checkpoints, ray_cluster, capsys, tmp_path):
    directory = tiny_checkpoints["llama"][0]
    output = tmp_path / "oracle.json"
    figures = load_bench("oracle").main(["--quick", "--synthetic", "--model", str(directory), "--output", str(output)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"wrote {output}"
    assert json.loads(lines[-2]) == json.loads(output.read_text()) == json.loads(json.dumps(figures))
    assert figures["peak"]["flops_per_s"] > 0 and "load average" in figures["uptime_before"]
    for length in ("3", "6"):
        cases = figures["limit"][length]["cases"]
        assert {f"{w}_{k}" for w in ("in_process", "pipeline") for k in ("shared", "unshared", "one_by_one")} == set(cases)
        assert all(c["flops"] > 0 and 0 < c["fraction_of_peak"] for c in cases.values())
    assert set(figures["scaling"]) == {"default", "population_x2", "examples_x2", "prompt_length_x2", "stages_x2"}
    assert figures["scaling"]["default"]["ratio"] == 1.0
    assert ray_cluster.is_initialized()  # the bench leaves a Ray it did not start running


@pytest.mark.cluster
@pytest.mark.slow
def test_bench_extend_quick_counts_memory_and_times_1_and_2_workers(tiny_checkpoints, ray_cluster, capsys, tmp_path):
    directory = tiny_checkpoints["llama"][0]
    output = tmp_path / "extend.json"
    bench = load_bench("extend")
    figures = bench.main(["--quick", "--model", str(directory), "--output", str(output)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"wrote {output}"
    assert json.loads(lines[-2]) == json.loads(output.read_text()) == json.loads(json.dumps(figures))
    methods = figures["methods"]
    assert set(methods) == {"neutral", "neutral-no-l1", "neutral-sigmoid", "neutral-he", "adapter", "lora", "full"}
    backbone = figures["backbone_parameters"]
    assert methods["full"]["trainable_parameters"] == backbone == 41248  # the tiny Llama, tied head once
    for name, c in methods.items():
        b = c["memory_bytes"]
        assert b["total"] == b["weights"] + b["gradients"] + b["optimizer"] + b["activations"]
        # fp32: a gradient and AdamW's two moments per trainable parameter, counted from the tensors
        assert b["gradients"] == 4 * c["trainable_parameters"]
        assert 0 <= b["optimizer"] - 2 * b["gradients"] < 4 * 100  # + a 4-byte step count per tensor
        assert b["activations"] > 0
        if name != "full":
            assert 0.15 < c["trainable_fraction"] < 0.25  # --extra-params 0.2
            assert b["total"] < methods["full"]["memory_bytes"]["total"]
    # The adapters add their own weights to the backbone's; full fine-tuning trains the backbone's.
    assert methods["neutral"]["memory_bytes"]["weights"] == 4 * (backbone + methods["neutral"]["trainable_parameters"])
    assert methods["full"]["memory_over_full"] == 1.0
    speed = figures["speed"]["neutral"]
    assert set(figures["speed"]) == {"neutral"}
    assert all(len(speed["step_times_s"][w]) == 2 for w in ("1", "2"))
    assert speed["speedup_2_workers"] == pytest.approx(speed["tokens_per_s"]["2"] / speed["tokens_per_s"]["1"])
    assert ray_cluster.is_initialized()  # the bench leaves a Ray it did not start running


def test_bench_extend_counts_saved_activations_exactly():
    """y = relu(x @ W): the matmul saves x only when W trains (W itself is a parameter: not counted),
    relu saves its output; x @ W twice saves x once (one storage)."""
    import torch

    bench = load_bench("extend")
    x, w = torch.randn(4, 8), torch.nn.Parameter(torch.randn(8, 16))
    exclude = {w.untyped_storage().data_ptr()}
    _, n = bench.saved_bytes(lambda: torch.relu(x @ w), exclude)
    assert n == 4 * 8 * 4 + 4 * 16 * 4
    _, n = bench.saved_bytes(lambda: (x @ w) * (x @ w).sum(), exclude)
    assert n == 4 * 8 * 4 + 4 * 16 * 4 + 4  # x once (one storage); the product saves both factors
    w.requires_grad_(False)
    assert bench.saved_bytes(lambda: torch.relu(x @ w), exclude)[1] == 0  # nothing wants a gradient
    assert bench.batches(2, 8, 4, 50)[1].tolist() == [True] + [False] * 7  # one row in 8 original-domain
