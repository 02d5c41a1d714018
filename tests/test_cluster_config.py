"""cluster.yaml and cluster-gcp.yaml pass Ray's own offline validation, and keep the security rules."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_cluster_config_validates(name):
    config = yaml.safe_load((ROOT / name).read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    nodes = prepared["available_node_types"]
    assert nodes[prepared["head_node_type"]]["resources"]["CPU"] == 0  # the head holds no shard
    assert {"cpu_worker", "gpu_worker"} <= set(nodes)
    assert all(nodes[n]["min_workers"] == 0 for n in ("cpu_worker", "gpu_worker"))
    assert prepared["idle_timeout_minutes"] > 0
    start = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in start  # the dashboard never listens on a public interface
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    assert any("pip install -e ~/raydapt" in c for c in prepared["setup_commands"])
