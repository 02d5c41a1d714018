"""MLtD (raydapt.mltd): the domain recipe's held-out rule and splits, the first-order MAML gradient
against an independent computation, a meta-batch spread over two workers equal bit for bit to one
worker, and (cluster) Ray Train meta-training with 1 and 2 workers, a killed worker, and --resume."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from raydapt.data.make_domains import held_out_names
from raydapt.errors import UserError
from raydapt.mltd.config import MLtDConfig
from raydapt.mltd.maml import (Task, apply_outer, fast_parameters, meta_gradient_rows, outer_optimizer,
                               outer_parameters, task_gradient)

RAYDAPT = Path(__file__).resolve().parents[1] / "raydapt"


def user_domains(tmp_path: Path, small: bool = False) -> Path:
    """A --domains-dir of real text: raydapt's own method folders, one domain each (plus a one-line one)."""
    root = tmp_path / "domains"
    root.mkdir(parents=True)
    for name in ("bbt", "adapters", "extend", "data", "comblm", "gdfo", "recursive", "idpt"):
        (root / name).symlink_to(RAYDAPT / name)
    if small:
        (root / "tiny.txt").write_text("x = 1\n")
    return root


def test_held_out_rule_is_the_first_quarter_by_name_hash():
    names = [f"d{i}" for i in range(10)]
    by_hash = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert held_out_names(names) == sorted(by_hash[:2]) == held_out_names(list(reversed(names)))
    assert len(held_out_names(["a", "b"])) == 1


def test_domains_split_apart_and_a_too_small_domain_is_refused(tmp_path):
    from raydapt.data.make_domains import build_domains
    from raydapt.defaults import default_model_dir
    from raydapt.mltd.job import check_domains
    from raydapt.models.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(str(default_model_dir("small")))
    meta_train, meta_test = build_domains(tokenizer, 32, 20, 6, str(user_domains(tmp_path, small=True)), 10)
    names = {d.name for d in meta_train + meta_test}
    assert len(names) == 9 and {d.name for d in meta_test} == set(held_out_names(sorted(names)))
    for d in meta_train + meta_test:
        if d.name == "tiny":
            continue
        assert d.train.shape == ((20 if d in meta_test else 10), 32) and d.test.shape == (6, 32)
        rows = {tuple(r) for r in d.train}
        assert not rows & {tuple(r) for r in d.test}  # train and test share no sequence
    fewer, _ = build_domains(tokenizer, 32, 5, 6, str(user_domains(tmp_path / "again")), 5)
    again = {d.name: d for d in fewer}
    for d in meta_train:  # the test split does not depend on the train size; smaller train splits are prefixes
        if d.name != "tiny":
            assert np.array_equal(again[d.name].test, d.test) and np.array_equal(again[d.name].train, d.train[:5])
    cfg = MLtDConfig(method="tarp-meta", inner_batch=4, context=32)
    with pytest.raises(UserError, match="domain tiny: 0 training sequences .* fewer than one inner batch"):
        check_domains(meta_train, meta_test, cfg)
    with pytest.raises(UserError, match="--meta-batch: 1 tasks cannot be spread over --workers 2"):
        MLtDConfig(meta_batch=1, workers=2)


def _model(tiny_checkpoints, method="tams-meta", base_lr=1e-4):
    from raydapt.adapters.tams import attach_tams
    from raydapt.adapters.tarp import attach_tarp

    cfg = MLtDConfig(method=method, rank=2, tams_width=4, base_lr=base_lr)
    model = copy.deepcopy(tiny_checkpoints["llama"][1]).eval()
    torch.manual_seed(0)
    model, _ = attach_tarp(model, cfg.tarp_config())
    if method == "tams-meta":
        model, _ = attach_tams(model, cfg.tams_config(), freeze=False)
    for name, p in model.named_parameters():
        p.requires_grad_(True)
    with torch.no_grad():  # away from init, so every term of the gradient is alive
        for layer in model.modules():
            if hasattr(layer, "p_out"):
                layer.p_out.weight.normal_(0, 0.05)
    return model


def _tasks(n=3):
    g = torch.Generator().manual_seed(5)
    return [Task(f"t{i}", torch.randint(0, 128, (8, 12), generator=g), torch.randint(0, 128, (4, 12), generator=g))
            for i in range(n)]


def test_first_order_gradient_equals_one_adam_step_then_the_test_gradient(tiny_checkpoints):
    model = _model(tiny_checkpoints, method="tarp-meta")
    outer = [p for _, p in outer_parameters(model, base=True)]
    before = [p.detach().clone() for p in outer]
    task = _tasks(1)[0]
    inner, rows = np.array([[0, 3]]), np.array([1, 2])
    grad, loss = task_gradient(model, outer, task, inner, rows, inner_lr=0.01)
    assert all(torch.equal(p, b) for p, b in zip(outer, before))  # the task leaves the model as found
    # Independently: Adam's first step is lr * g / (|g| + eps); then the plain gradient of the test loss.
    twin = copy.deepcopy(model)
    fast = fast_parameters(twin)
    g0 = torch.autograd.grad(twin(input_ids=task.train[[0, 3]], labels=task.train[[0, 3]]).loss, fast)
    with torch.no_grad():
        for p, g in zip(fast, g0):
            p -= 0.01 * g / (g.abs() + 1e-8)
    x = task.test[[1, 2]]
    want_loss = twin(input_ids=x, labels=x).loss
    by_name = dict(twin.named_parameters())
    names = [n for n, _ in outer_parameters(model, base=True)]
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(want_loss, [by_name[n] for n in names])])
    assert loss == pytest.approx(float(want_loss), rel=1e-5)
    assert torch.allclose(grad, want, atol=1e-6, rtol=1e-4) and grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["tams-meta", "multitask"])
def test_a_meta_batch_over_two_workers_sums_to_the_one_worker_buffer_bit_for_bit(tiny_checkpoints, method):
    model = _model(tiny_checkpoints, method="tams-meta")
    outer = [p for _, p in outer_parameters(model, base=True)]
    tasks = _tasks()
    mode = "multitask" if method == "multitask" else "maml"
    args = (tasks, 3, 0)
    one = meta_gradient_rows(model, outer, *args, range(0, 4), 4, 2, 2, 0.01, mode)
    rank0 = meta_gradient_rows(model, outer, *args, range(0, 4, 2), 4, 2, 2, 0.01, mode)
    rank1 = meta_gradient_rows(model, outer, *args, range(1, 4, 2), 4, 2, 2, 0.01, mode)
    assert torch.equal(rank0 + rank1, one)  # what the all-reduce computes
    assert (one[:, :-1].abs().sum(1) > 0).all()
    names = [n for n, _ in outer_parameters(model, base=True)]
    offsets = np.cumsum([0] + [p.numel() for p in outer])
    ctrl = [i for i, n in enumerate(names) if n.startswith("tams_controller.")]
    assert one[:, offsets[ctrl[0]]:offsets[ctrl[-1] + 1]].abs().sum() > 0  # the controller learns
    opt = outer_optimizer(model, 1e-3, 1e-4)
    loss = apply_outer(outer, opt, one)
    assert loss == pytest.approx(float(one[:, -1].mean()))


@pytest.mark.cluster
@pytest.mark.slow
def test_ray_train_meta_training_is_the_same_on_1_and_2_workers_and_after_a_killed_worker(ray_cluster, tmp_path):
    """Outer parameters after 4 meta-steps: bytes equal for 1 worker, 2 workers, and 2 workers of which
    one is killed at meta-step 3 (restarted from the step-2 checkpoint); --resume keeps a finished run."""
    from actors.runner import RayRuntime
    from raydapt.config import parse_args
    from raydapt.defaults import default_model_dir
    from raydapt.mltd.job import run_mltd_job

    common = ["--method", "tams-meta", "--model", str(default_model_dir("small")), "--domains-dir",
              str(user_domains(tmp_path)), "--context", "32", "--meta-steps", "4", "--meta-batch", "2",
              "--inner-steps", "1", "--inner-batch", "2", "--checkpoint-every", "2", "--adapt-steps", "2",
              "--train-sequences", "8", "--meta-train-sequences", "8", "--test-sequences", "4", "--seed", "3"]
    results = {}
    for name, extra in (("one", ["--workers", "1"]), ("two", ["--workers", "2"]),
                        ("killed", ["--workers", "2", "--fault-injection", "kill-worker:after-steps=3"])):
        cfg = parse_args(MLtDConfig, [*common, *extra, "--output-dir", str(tmp_path / name)])
        results[name] = run_mltd_job(cfg, RayRuntime)
    weights = {n: (tmp_path / n / "mltd.safetensors").read_bytes() for n in results}
    assert weights["one"] == weights["two"] == weights["killed"]  # tolerance 0: bit for bit
    assert results["killed"]["worker_failures_injected"] == 1
    for key in ("perplexity", "final_outer_loss", "first_outer_loss"):
        assert results["one"][key] == results["two"][key] == results["killed"][key], key
    assert results["one"]["meta_steps"] == 4
    again = parse_args(MLtDConfig, [*common, "--workers", "2", "--resume", "--output-dir", str(tmp_path / "two")])
    assert run_mltd_job(again, lambda: pytest.fail("a finished run started Ray Train")) == results["two"]


def test_results_section_tests_each_step_of_the_ordering_on_paired_seeds():
    from raydapt.mltd.report import mltd_section

    def runs(method, means):
        return [{"seed": s, "method": method, "mean_perplexity": m, "perplexity": {"a": m, "b": m},
                 "trainable_share": 0.1, "held_out_rule": "rule", "_log": Path("x/y/log.jsonl"),
                 "config": {"model": "m", "tarp": "dynamic", "rank": 4, "meta_steps": 1, "meta_batch": 2,
                            "inner_steps": 1, "adapt_steps": 1, "train_sequences": 8, "context": 8}}
                for s, m in zip((1, 2, 3), means)]
    rows = {"mltd-zero-shot": runs("zero-shot", [100, 101, 102]),
            "mltd-full": runs("full", [90, 92, 91]),           # 10 +- 1 lower: holds
            "mltd-tarp": runs("tarp", [80, 99, 85]),          # noisy: no verdict
            "mltd-tarp-meta": runs("tarp-meta", [81, 100.5, 86.1]),  # consistently ~1 higher: reversed
            "mltd-tams-meta": runs("tams-meta", [81, 100.5, 86.1])}  # equal: no spread
    text = "\n".join(mltd_section("quick", rows))
    assert "| zero-shot > full | 10.00 ± 1.00 | 0.003 | holds |" in text
    assert "| full > tarp |" in text and "no difference beyond the noise" in text
    assert "| tarp > tarp-meta |" in text and "does not hold: reversed" in text
    assert "| tarp-meta > tams-meta | 0.00 ± 0.00 | – | not tested (one seed or no spread) |" in text
    assert "| zero-shot | 3 | 10.00% | 101.0 ± 1.0 | 101.0 ± 1.0 | 101.0 ± 1.0 |" in text


def test_suite_runs_cover_every_method_and_the_low_data_domain_is_held_out():
    import importlib.util

    from raydapt.config import parse_args
    from raydapt.data.make_domains import all_domain_names
    from raydapt.mltd.config import METHODS, QUICK
    from raydapt.mltd.report import LOW_DATA_DOMAIN, LOW_DATA_SIZES

    spec = importlib.util.spec_from_file_location("suite_under_test", RAYDAPT.parent / "jobs" / "suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    runs = {name: flags for name, (job, flags) in suite.RUNS.items() if job == "mltd"}
    assert "mltd" in suite.NEEDS_RAY
    cfgs = {name: parse_args(MLtDConfig, ["--quick", *flags], presets={"quick": QUICK}) for name, flags in runs.items()}
    assert {c.method for n, c in cfgs.items() if "lowdata" not in n} == set(METHODS)
    low = [c for n, c in cfgs.items() if "lowdata" in n]
    assert sorted({c.train_sequences for c in low}) == list(LOW_DATA_SIZES) and {c.domains[0] for c in low} == {LOW_DATA_DOMAIN}
    assert LOW_DATA_DOMAIN in held_out_names(all_domain_names()["prose"])
