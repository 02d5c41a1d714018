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
