"""Recursive LMs (raydapt/recursive, jobs/recursive.py): the connector and the hand-over between the
passes on known answers; tiny runs that learn, leave the frozen LM untouched, and give the same
bytes on 1 x 1 and 2 x 2 and after a SIGKILL + --resume with every neutral field changed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_bbt_job import check_resume_changes, kill_mid_run

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "recursive.py")]
# Far smaller than --quick: mechanics, not quality. 4 + 4 + 6 steps, an evaluation every 2.
TINY = ["--quick", "--seed", "5", "--steps", "4", "--pretrain-steps", "4", "--second-steps", "6", "--eval-every", "2",
        "--batch", "8", "--pretrain-batch", "8", "--states", "4", "--samples", "2", "--connector-width", "32"]
RESUME_CHANGES = ["--replicas", "2", "--stages", "2", "--cpus-per-stage", "2", "--log-every", "1", "--recompute",
                  "--fault-injection", "kill-stage:after-calls=3,stage=1"]


@pytest.fixture
def one_thread_afterwards():
    """Jobs pin the coordinator to one torch thread; give the rest of the session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(argv: list, runtime) -> dict:
    from raydapt.config import parse_args
    from raydapt.recursive.config import QUICK, RecursiveConfig
    from raydapt.recursive.job import run_recursive_job
    return run_recursive_job(parse_args(RecursiveConfig, [*map(str, argv)], presets={"quick": QUICK}), runtime)


def untimed(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("wall_time_s", "config", "fault_tolerance", "oracle_usage")}


def same_run(a: Path, b: Path) -> None:
    assert (a / "modules.safetensors").read_bytes() == (b / "modules.safetensors").read_bytes()
    assert untimed(json.loads((a / "result.json").read_text())) == untimed(json.loads((b / "result.json").read_text()))
    assert (a / "log.jsonl").read_text() == (b / "log.jsonl").read_text()


def test_connector_is_the_residual_at_init_and_adds_its_mlp():
    from raydapt.recursive.connector import Connector, RecursiveLM

    torch.manual_seed(0)
    c = Connector(width=2, hidden=3, embedding_std=0.5)
    h = torch.tensor([[[1.0, -2.0]]])                      # (B=1, m=1, D=2)
    assert torch.equal(c(h), 0.5 * h)                       # the MLP starts at zero: states at embedding scale
    with torch.no_grad():
        c.up.weight.zero_()
        c.up.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))    # gelu: 0, 0.8413447, -0.1586553
        c.down.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        c.down.bias.copy_(torch.tensor([0.25, 0.0]))
    expected = torch.tensor([[[0.5 + 0.25, -1.0 + 0.8413447 - 0.1586553]]])
    assert torch.allclose(c(h), expected, atol=1e-6)

    model = RecursiveLM("neural", prompt_length=3, width=2, embedding_std=0.5, connector_width=3)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(model.trainable("first")) == ids(model.first.parameters())
    assert ids(model.trainable("pretrain")) == ids(model.connector.parameters())
    assert ids(model.trainable("second")) == ids([*model.second.parameters(), *model.connector.parameters()])
    states = torch.randn(4, 5, 2)
    prompt = model.second_prompt(4, states)                 # pass 2: its soft prompt, then the connector's vectors
    assert prompt.shape == (4, 3 + 5, 2) and torch.equal(prompt[:, 3:], model.connector(states))


def test_pass_two_reads_the_answers_above_the_input_and_the_states_before_its_end():
    from raydapt.data.multitask import IGNORE, EncodedMulti
    from raydapt.recursive.passes import last_states, with_answers

    END, PAD, MARK = 9, 0, [7]
    enc = EncodedMulti(task=np.zeros(2, np.int64), input_ids=np.array([[1, 2, 3, END], [4, 5, END, PAD]]),
                       lengths=np.array([4, 3]), labels=np.array([[IGNORE, IGNORE, 3, END], [IGNORE, 5, END, IGNORE]]),
                       target_start=np.array([2, 1]))
    answers = [[3, END], [6], [END], [5, END]]              # row 0: "3", "6" (cut off); row 1: "", "5"
    two = with_answers(enc, answers, 2, MARK, END, PAD)
    assert two.input_ids.tolist() == [[7, 3, END, 7, 6, END, 1, 2, 3, END],
                                      [7, END, 7, 5, END, 4, 5, END, PAD, PAD]]
    assert two.lengths.tolist() == [10, 8] and two.target_start.tolist() == [8, 6]
    assert two.labels.tolist()[1] == [IGNORE] * 6 + [5, END, IGNORE, IGNORE]   # the targets only, moved along
    hidden = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    assert last_states(hidden, np.array([4, 6]), 2)[..., 0].tolist() == [[2.0, 3.0], [10.0, 11.0]]


def _recording(base):
    """A runtime that keeps the pool it opened, and the frozen weights' state when it opened it."""
    class Recording(base):
        def open_pool(self, spec, fault=None):
            self.pool = super().open_pool(spec, fault)
            self.before = self.pool.frozen_state()
            return self.pool
    return Recording()


@pytest.mark.slow
def test_a_short_one_pass_run_learns_and_leaves_the_frozen_lm_untouched(tmp_path, one_thread_afterwards):
    from actors.runner import LocalRuntime

    runtime, out = _recording(LocalRuntime), tmp_path / "one"
    result = run(["--quick", "--local", "--method", "one_pass", "--seed", "3", "--steps", "15", "--second-steps", "15",
                  "--eval-every", "30", "--output-dir", out], runtime)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and {r["phase"] for r in log} == {"first"}
    first, last = np.mean([r["train_loss"] for r in log[:5]]), np.mean([r["train_loss"] for r in log[-5:]])
    assert last < 0.9 * first, (first, last)
    assert result["test_exact_match"] == np.mean(result["test_correct"]) and len(result["test_correct"]) == 96
    after = [s for chain in runtime.pool.frozen_state() for s in chain]
    assert all(s["requires_grad"] == 0 and s["grads"] == 0 for s in after)          # .grad None everywhere
    assert [s["digest"] for s in after] == [s["digest"] for c in runtime.before for s in c]  # bytes unchanged
    assert (out / "curve.png").exists() and (out / "checkpoint" / "index.json").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_same_bytes_on_1x1_and_2x2_and_after_a_kill_and_resume(tmp_path, ray_cluster, one_thread_afterwards):
    """Textual: 1 x 1 in process = 2 x 2 on Ray actors (the sampling included). Neural: killed in
    pass 2's phase and resumed on 2 x 2 actors with every neutral field changed and a stage killed =
    uninterrupted, with the frozen LM untouched by the connector's pre-training and tuning."""
    from actors.runner import LocalRuntime, RayRuntime
    from raydapt.recursive.config import RESULT_NEUTRAL_FIELDS

    text_one, text_four = tmp_path / "text-1x1", tmp_path / "text-2x2"
    run([*TINY, "--method", "textual", "--local", "--output-dir", text_one], LocalRuntime())
    run([*TINY, "--method", "textual", "--replicas", "2", "--stages", "2", "--output-dir", text_four], RayRuntime())
    same_run(text_one, text_four)
    assert len((text_one / "test_answers.jsonl").read_text().splitlines()) == 96

    whole, killed, moved = tmp_path / "whole", tmp_path / "killed", tmp_path / "moved"
    runtime = _recording(LocalRuntime)
    result = run([*TINY, "--method", "neural", "--local", "--output-dir", whole], runtime)
    after = [s for chain in runtime.pool.frozen_state() for s in chain]
    assert all(s["grads"] == 0 for s in after) and [s["digest"] for s in after] == [
        s["digest"] for c in runtime.before for s in c]
    assert [r["phase"] for r in map(json.loads, (whole / "log.jsonl").read_text().splitlines())] == (
        ["first"] * 4 + ["pretrain"] * 4 + ["second"] * 6)
    assert result["connector_held_out_lm_loss"] > 0
    before = kill_mid_run([*JOB, *TINY, "--method", "neural", "--local"], killed, rows=11)  # checkpoint at step 10
    killed.rename(moved)
    run([*TINY, "--method", "neural", *RESUME_CHANGES, "--output-dir", moved, "--resume"], RayRuntime())
    resumed = json.loads((moved / "result.json").read_text())
    check_resume_changes(moved / "config.json", resumed, RESULT_NEUTRAL_FIELDS)
    same_run(whole, moved)
    assert (moved / "log.jsonl").read_text().splitlines()[:10] == before[:10]  # kept, not redone
    assert resumed["fault_tolerance"]["injected"] and resumed["fault_tolerance"]["stage_restarts"] == 1
