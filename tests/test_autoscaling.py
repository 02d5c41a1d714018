"""Autoscaling on one machine: Ray's fake multi-node provider (tests/fake_cluster.yaml, laid out
like cluster.yaml) adds worker nodes when stage actors need them and removes them when idle.

The head is a real `ray start --head` of this test's own (tests/heads.py: temporary directory,
token authentication, free ports) with no CPU, started with `RAY_FAKE_CLUSTER=1` and
`--autoscaling-config`: the monitor then runs the fake provider, which starts each worker node as
another raylet on this machine, under the head's temporary directory. `RAY_FAKE_CLUSTER=1` gives
the head the provider's fixed head node id (fff...f00000), and `use_node_id_as_ip` makes the
autoscaler key nodes by id rather than by the IP that all of them share.

The stage actors are a `RayPool` (2 stages of 1 CPU in a placement group), driven in a process of
its own (this file run as a script: one Ray driver per process, whatever else the test session
has connected to). Stopping the head ends exactly the processes whose command line names its
temporary directory: worker nodes included, no other Ray on the machine touched.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_S = 12  # idle_timeout_minutes: 0.2 in tests/fake_cluster.yaml
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def drive(address: str, model_dir: str) -> dict:
    """The driver: RayPool on an empty cluster, a forward through it, then shut it down and wait."""
    import numpy as np
    import ray

    from actors.pipeline import LocalPool, RayPool
    from raydapt.serving import PoolSpec
    from raydapt.oracle import ShardedOracle

    rng = np.random.default_rng(0)
    ids, lengths = rng.integers(0, 128, (9, 12)), rng.integers(5, 12, 9)
    prompts = rng.normal(0, 0.5, (6, 3, 32)).astype(np.float32)
    spec = PoolSpec(model_dir, stages=2, cpus_per_stage=1.0)
    reference = ShardedOracle(LocalPool(spec), 4).label_logits(ids, lengths, [1, 2], prompts)

    ray.init(address=address, logging_level="ERROR")
    alive = lambda: sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])  # noqa: E731
    report = {"nodes_before": alive(), "head_cpus": ray.cluster_resources().get("CPU", 0.0)}
    began = time.monotonic()

    def watch():  # when the workers join, while RayPool waits for its placement group
        while len(alive()) < 3 and time.monotonic() - began < 120:
            time.sleep(0.25)
        report["nodes_up_s"] = time.monotonic() - began

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    pool = RayPool(spec)  # returns once its placement group is placed and every stage answers
    report["add_s"] = time.monotonic() - began
    watcher.join()
    report["nodes_with_pool"] = alive()
    report["stage_nodes"] = [stage["node"] for stage in pool.describe()[0]]
    logits = ShardedOracle(pool, 4).label_logits(ids, lengths, [1, 2], prompts)
    report["forward_equal"] = bool(np.array_equal(logits, reference))
    pool.shutdown()
    began = time.monotonic()
    while len(alive()) > 1 and time.monotonic() - began < 90:
        time.sleep(0.5)
    report["remove_s"] = time.monotonic() - began
    report["nodes_after"] = alive()
    return report


if __name__ == "__main__":
    # The report goes to a file: the driver's stdout also carries Ray's "(autoscaler +Ns)" events.
    Path(sys.argv[3]).write_text(json.dumps(drive(sys.argv[1], sys.argv[2])))
    sys.exit(0)


import psutil  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from raydapt.results import bench_output, machine, write_bench  # noqa: E402
from tests.conftest import make_checkpoint  # noqa: E402
from tests.heads import free_port, ray_head, stop_head  # noqa: E402


def ours(temp_dir: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                found.append(f"{proc.pid}: " + " ".join(proc.info["cmdline"])[:200])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture()
def fake_cluster(tmp_path):
    from ray._private.services import get_node_ip_address

    config = yaml.safe_load(Path(__file__).with_name("fake_cluster.yaml").read_text())
    assert config["idle_timeout_minutes"] * 60 == IDLE_TIMEOUT_S
    port = free_port()
    # The provider starts worker raylets against this GCS address (its default is port 6379).
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
    path = tmp_path / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head = None
    try:
        with ray_head(num_cpus=0, port=port, extra_env=env,
                      extra_args=(f"--autoscaling-config={path}", "--object-store-memory=100000000")) as head:
            yield head
    finally:
        if head is not None:
            # ray_head's stop_head ended every process that names the temporary directory (worker
            # nodes too). A raylet or the monitor can outlast stop_head's 10 s grace after SIGTERM
            # and be sent SIGKILL, which stop_head does not wait for: give it a moment to go.
            deadline = time.monotonic() + 15
            while ours(head["temp_dir"]) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = ours(head["temp_dir"])
            if left:
                stop_head(head["temp_dir"])
            assert not left, left


@pytest.mark.cluster
@pytest.mark.slow
def test_workers_added_for_stages_and_removed_when_idle(fake_cluster, tmp_path):
    load_before = os.getloadavg()
    model_dir = tmp_path / "llama"
    make_checkpoint("llama", model_dir)
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, __file__, fake_cluster["address"], str(model_dir), str(out)],
                         env=fake_cluster["env"], cwd=ROOT, capture_output=True, text=True, timeout=150)
    monitor = Path(fake_cluster["temp_dir"], "session_latest", "logs", "monitor.log").read_text()
    assert run.returncode == 0, run.stderr[-3000:] + monitor[-3000:]
    report = json.loads(out.read_text())
    print(json.dumps({k: report[k] for k in ("nodes_up_s", "add_s", "remove_s")}))

    # Before: the head alone, under the fake provider's head id, with no CPU for a stage.
    assert report["nodes_before"] == [FAKE_HEAD_NODE_ID] and report["head_cpus"] == 0
    # The pool's 2 x 1-CPU bundles brought up two 1-CPU worker nodes, and its stages run there.
    added = set(report["nodes_with_pool"]) - {FAKE_HEAD_NODE_ID}
    assert len(added) == 2, report
    assert set(report["stage_nodes"]) <= added, report
    assert report["forward_equal"]
    assert re.search(r"Adding \d node\(s\) of type cpu_worker", monitor)
    # Released: both workers go, as idle, once the idle timeout has passed (and not before).
    assert report["nodes_after"] == [FAKE_HEAD_NODE_ID], report
    removed = re.findall(r":event_summary:Removing (\d) nodes of type cpu_worker \(idle\)", monitor)
    assert sum(map(int, removed)) == 2, monitor[-3000:]
    assert IDLE_TIMEOUT_S * 0.75 <= report["remove_s"] <= IDLE_TIMEOUT_S + 30, report
    # The README's autoscaling timings are rendered from results/bench/autoscaling.json (python -m
    # raydapt.results); RAYDAPT_RECORD=1 records this run's there, otherwise the suite leaves it be.
    target = bench_output("autoscaling") if os.environ.get("RAYDAPT_RECORD") == "1" else tmp_path / "autoscaling.json"
    write_bench(target, {k: report[k] for k in ("nodes_up_s", "add_s", "remove_s", "forward_equal")}
                | {"idle_timeout_s": IDLE_TIMEOUT_S, "machine": machine(load_before)})
