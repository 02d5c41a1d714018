"""jobs/idpt.py end to end: the loss falls, the same bytes on 1 x 1 and 2 x 2 and after a SIGKILL
+ --resume with every neutral field changed; the prompt generator's pieces; bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.entry_points import assert_one_line_error, run_in_process
from tests.test_bbt_job import check_resume_changes, kill_mid_run

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "idpt.py")]
# Smaller than --quick: mechanics, not quality. Two tasks, 8 steps, a checkpoint every 2.
SMALL = ["--quick", "--seed", "5", "--steps", "8", "--eval-every", "2", "--batch", "8",
         "--tasks", "exception,function_name"]
RESUME_CHANGES = ["--replicas", "2", "--stages", "2", "--cpus-per-stage", "2", "--log-every", "1", "--recompute",
                  "--fault-injection", "kill-stage:after-calls=3,stage=1"]


def run_job(*args, timeout=600):
    import subprocess
    result = subprocess.run([*JOB, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def untimed(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("wall_time_s", "config", "fault_tolerance", "oracle_usage")}


def test_generator_reads_only_real_tokens_and_learns_only_its_own_parts():
    from transformers import AutoModelForCausalLM

    from raydapt.defaults import default_model_dir
    from raydapt.idpt.generator import PromptGenerator

    torch.manual_seed(0)
    encoder = AutoModelForCausalLM.from_pretrained(default_model_dir("small"), use_safetensors=True)
    gen = PromptGenerator(encoder, prompt_length=3, soft_length=2, out_dim=16, embedding_std=0.5)
    ids = torch.randint(5, 100, (2, 7))
    padded = ids.clone()
    padded[1, 4:] = 0
    a, b = gen(ids, torch.tensor([7, 4])), gen(padded, torch.tensor([7, 4]))
    assert a.shape == (2, 3, 16) and torch.equal(a, b)  # what lies past a row's length is not read
    assert not torch.equal(a[0], a[1])                   # input-dependent
    a.sum().backward()
    assert all(p.grad is None for p in gen.encoder.parameters())
    assert all(p.grad is not None for n, p in gen.named_parameters() if not n.startswith(("encoder.", "base.")))


@pytest.mark.slow
def test_quick_run_learns_and_records_everything(tmp_path):
    out = tmp_path / "run"
    run_job("--quick", "--local", "--seed", "3", "--output-dir", out)
    result = json.loads((out / "result.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == result["config"]["steps"] == 30
    first, last = np.mean([r["train_loss"] for r in log[:5]]), np.mean([r["train_loss"] for r in log[-5:]])
    assert last < first, (first, last)
    assert set(result["test_exact_match"]) == set(result["tasks"]) and len(result["tasks"]) >= 4
    assert 0 <= result["test_average"] <= 1 and 0 <= result["manual_prompt_test_average"] <= 1
    from safetensors import safe_open
    with safe_open(str(out / "prompt_module.safetensors"), "np") as f:
        meta = json.loads(f.metadata()["raydapt"])
        assert meta["method"] == "idpt" and "attend.in_proj_weight" in f.keys() and "queries" in f.keys()
        assert not any(k.startswith(("encoder.", "base.")) for k in f.keys())  # the frozen small LM is not saved
    assert (out / "curve.png").exists() and (out / "checkpoint" / "index.json").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_same_bytes_on_1x1_and_after_a_kill_and_a_resume_on_2x2(tmp_path):
    """Killed in process, resumed on 2 x 2 stage actors (one killed during a training step) with
    every neutral field changed: the steps after the resume run on 2 x 2 and must give the same bytes."""
    from raydapt.idpt.config import RESULT_NEUTRAL_FIELDS

    whole, killed, moved = (tmp_path / n for n in ("whole", "killed", "moved"))
    run_job(*SMALL, "--local", "--output-dir", whole)
    before = kill_mid_run([*JOB, *SMALL, "--local"], killed, rows=3)
    killed.rename(moved)
    run_job(*SMALL, *RESUME_CHANGES, "--output-dir", moved, "--resume")
    check_resume_changes(moved / "config.json", json.loads((moved / "result.json").read_text()), RESULT_NEUTRAL_FIELDS)
    assert (whole / "prompt_module.safetensors").read_bytes() == (moved / "prompt_module.safetensors").read_bytes()
    assert untimed(json.loads((whole / "result.json").read_text())) == untimed(json.loads((moved / "result.json").read_text()))
    assert (whole / "log.jsonl").read_text() == (moved / "log.jsonl").read_text()
    assert (moved / "log.jsonl").read_text().splitlines()[:2] == before[:2]  # kept, not redone
    report = json.loads((moved / "result.json").read_text())["fault_tolerance"]
    assert report["injected"] and report["stage_restarts"] == 1


def test_resume_with_a_different_config_is_refused(tmp_path):
    from raydapt.config import parse_args, to_dict
    from raydapt.idpt.config import QUICK, IDPTConfig

    out = tmp_path / "o"
    out.mkdir()
    saved = to_dict(parse_args(IDPTConfig, ["--quick", "--local", "--output-dir", str(out)], presets={"quick": QUICK}))
    (out / "config.json").write_text(json.dumps(saved | {"lr": 0.5}))
    result = run_in_process("jobs/idpt.py", ["--quick", "--local", "--output-dir", out, "--resume"])  # Ray guarded
    assert_one_line_error(result, "--resume", "different config", "lr")
