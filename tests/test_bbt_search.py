"""The BBT/BBTv2 coordinator against a fake oracle whose best prompt is known."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from raydapt.bbt.config import BBTConfig
from raydapt.bbt.inputs import EncodedTask, Split
from raydapt.bbt.search import PromptSearch
from raydapt.bbt.space import DeepPromptSpace, PromptSpace
from raydapt.oracle import ModelInfo, Usage

WIDTH, LENGTH, LAYERS = 8, 2, 3


class TargetOracle:
    """The gold label's logit is minus the squared distance of the prompt to a fixed target."""
    info = ModelInfo("fake", LAYERS, 16, WIDTH, WIDTH, 64)

    def __init__(self):
        self.usage = Usage()
        self.target = np.random.default_rng(0).normal(0, 0.05, (LENGTH, WIDTH))

    def label_logits(self, input_ids, lengths, label_ids, prompts=None, mode="add", offset=0):
        n = len(lengths)
        if prompts is None:
            prompts = np.zeros((1, LENGTH, WIDTH))
        if mode == "deep":
            prompts = prompts.sum(axis=1)  # the layers' prompts act together
        distance = ((prompts - self.target) ** 2).sum(axis=(1, 2))               # (P,)
        labels = input_ids[:, 0]
        logits = np.zeros((len(prompts), n, 2))
        # 0 for the zero prompt (a tie: half right), positive (all right) for anything closer.
        logits[:, np.arange(n), labels] = 1 - distance[:, None] / (self.target ** 2).sum()
        self.usage = self.usage.plus(Usage(calls=len(prompts), examples=len(prompts) * n))
        return logits


def split(n: int) -> Split:
    labels = np.arange(n) % 2
    return Split(labels[:, None].astype(np.int64), np.ones(n, np.int64), labels)


DATA = EncodedTask(split(8), split(8), split(8), split(8), [0, 1], 0)


def search(tmp_path, method="bbt", **overrides):
    cfg = dataclasses.replace(BBTConfig(method=method, budget=400, popsize=8, intrinsic_dim=6,
                                        prompt_length=LENGTH, dev_every=80, seed=3, log_every=10**6), **overrides)
    if method == "bbtv2":
        space = DeepPromptSpace(cfg.intrinsic_dim, LENGTH, WIDTH, [0.05] * LAYERS, cfg.seed)
    else:
        space = PromptSpace(cfg.intrinsic_dim, LENGTH, WIDTH, 0.05, cfg.seed)
    return PromptSearch(cfg, TargetOracle(), DATA, space, tmp_path, progress=lambda line: None)


@pytest.mark.parametrize("method, optimizer", [("bbt", "cma"), ("bbt", "TwoPointsDE"), ("bbtv2", "cma")])
def test_loss_falls_and_budget_is_exact(tmp_path, method, optimizer):
    s = search(tmp_path, method, optimizer=optimizer)
    first_loss = s.step(s.fresh_state())["population_mean_loss"]
    s = search(tmp_path / "run", method, optimizer=optimizer)
    (tmp_path / "run").mkdir()
    state = s.run(s.fresh_state())
    assert state.api_calls == 400 and state.generation == 50
    assert state.best_train_loss < 0.5 * first_loss
    assert state.best_dev_accuracy == 1.0 and state.best_z is not None
    assert s.oracle.usage.calls == 400 + 5  # the train calls plus one dev call at 80, 160, 240, 320, 400
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 50 and sum('"dev_accuracy"' in line for line in log) == 5


def test_progress_bar_counts_api_calls_and_resumes_where_it_stopped(tmp_path, capsys):
    """The bar runs over API calls (with an ETA); a resumed run's bar starts at the calls already spent."""
    (tmp_path / "run").mkdir()
    s = search(tmp_path / "run", budget=160)
    s.run(s.fresh_state())
    first = capsys.readouterr().err
    assert "| 0/160 [" in first and "| 160/160 [" in first and "call/s" in first, first
    s = search(tmp_path / "run", budget=240)  # the same search given more budget: continues at 160
    s.run(s.resume())
    second = capsys.readouterr().err
    assert "| 160/240 [" in second and "| 240/240 [" in second and "| 0/240 [" not in second, second


def test_resumed_search_equals_uninterrupted(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = search(tmp_path / "a")
    expected = whole.run(whole.fresh_state())
    part = search(tmp_path / "b")
    calls = 0
    real = part.oracle.label_logits

    def dies_at_generation_23(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 23 + 2:  # 23 generations and 2 dev scorings went through
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    part.oracle.label_logits = dies_at_generation_23
    with pytest.raises(KeyboardInterrupt):
        part.run(part.fresh_state())
    resumed = search(tmp_path / "b")
    state = resumed.run(resumed.resume())
    assert np.array_equal(state.best_z, expected.best_z)
    assert state.best_train_loss == expected.best_train_loss
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == (tmp_path / "b" / "log.jsonl").read_text().count("\n")


def test_log_rows_split_time_into_oracle_and_coordinator(tmp_path):
    s = search(tmp_path, budget=80, dev_every=40)
    state = s.run(s.fresh_state())
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["oracle_s"] > 0 and r["coordinator_s"] >= 0 for r in rows)
    assert state.oracle_s == pytest.approx(sum(r["oracle_s"] for r in rows), abs=1e-5)
    assert state.coordinator_s == pytest.approx(sum(r["coordinator_s"] for r in rows), abs=1e-5)
    assert state.oracle_s + state.coordinator_s <= state.elapsed_s + 1e-5


def test_lq_cma_search_counts_only_the_points_the_teacher_scored(tmp_path):
    # lq-CMA-ES asks 1..popsize points per request: the loop must count exactly those as API calls
    (tmp_path / "run").mkdir()
    s = search(tmp_path / "run", optimizer="lq-cma")
    first = search(tmp_path, optimizer="cma")
    first_loss = first.step(first.fresh_state())["population_mean_loss"]
    state = s.run(s.fresh_state())
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    dev_calls = sum("dev_accuracy" in row for row in rows)
    assert 400 - 8 < state.api_calls <= 400 and s.oracle.usage.calls == state.api_calls + dev_calls
    assert state.generation == len(rows) > 50  # fewer points per request than a population of 8
    assert state.best_train_loss < 0.5 * first_loss
