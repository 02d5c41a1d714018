"""Several raylets on one machine: SPREAD puts stages on different nodes, the results equal the
single-process run, and losing a node that holds a stage still ends with the same numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.cluster
@pytest.mark.slow
def test_spread_stages_and_node_loss(tiny_checkpoints):
    script = Path(__file__).with_name("multinode_check.py")
    result = subprocess.run([sys.executable, str(script), str(tiny_checkpoints["llama"][0])], capture_output=True,
                            text=True, timeout=600, cwd=script.parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["distinct_nodes"] == 2
    assert report["first_equal"] and report["after_removal_equal"]
    assert report["stage_restarts"] == 1
