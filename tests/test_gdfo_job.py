"""jobs/gdfo.py end to end: the black-box boundary, GDFO without trust equals BBT, resume and
invariance, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.entry_points import assert_one_line_error, run_in_process
from tests.test_bbt_job import RESUME_CHANGES, SMALL, check_resume_changes, kill_mid_run, metrics

ROOT = Path(__file__).resolve().parents[1]
GDFO = [sys.executable, str(ROOT / "jobs" / "gdfo.py")]
SMALL_GDFO = [*SMALL, "--baseline", "none"]


def run(cmd, *args):
    result = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.cluster
@pytest.mark.slow
def test_teacher_weights_never_leave_the_stage_actors(tmp_path):
    result = run([sys.executable, str(ROOT / "tests" / "gdfo_audit.py")], tmp_path / "audit")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["teacher_shapes"]  # e.g. (4096, 256) embeddings, (256, 256) projections
    # The scan sees numpy arrays (a probe of a teacher shape is found), and the coordinator holds
    # many (the stages' answers are numpy): no torch tensor and no numpy array of a teacher shape.
    assert report["control_found"] and report["coordinator_numpy_arrays"] > 0 and report["student_numpy_arrays"] > 0
    assert report["coordinator"] == [] and report["student"] == []
    assert report["student_pid"] != os.getpid() and report["api_calls"] > 0


@pytest.mark.slow
def test_gdfo_that_never_trusts_its_student_is_bbt(bbt_small_run, tmp_path):
    run(GDFO, *SMALL_GDFO, "--local", "--trust", "never", "--output-dir", tmp_path / "gdfo")
    assert (bbt_small_run / "best_prompt.safetensors").read_bytes() == \
        (tmp_path / "gdfo" / "best_prompt.safetensors").read_bytes()
    gdfo = json.loads((tmp_path / "gdfo" / "result.json").read_text())
    assert gdfo["injected_points"] == 0 and gdfo["method"] == "gdfo"
    assert (tmp_path / "gdfo" / "student" / "model.safetensors").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_gdfo_same_in_process_and_after_a_resume_on_2x2_that_changes_every_neutral_field(tmp_path):
    from raydapt.bbt.config import RESULT_NEUTRAL_FIELDS

    one, killed, moved = tmp_path / "local", tmp_path / "killed", tmp_path / "moved"
    # --trust always: the injected points' path must be exercised across the resume, whatever the
    # tiny student's rank agreement (adaptive trust injects only when it is significant); guided
    # samples too (their directions and seeds are in the checkpoint)
    small = [*SMALL_GDFO, "--trust", "always", "--guided-share", "0.4"]
    run(GDFO, *small, "--local", "--output-dir", one)
    # Killed in process (kill_mid_run checks result.json is absent), resumed on Ray with every
    # result-neutral field changed, from a moved directory: 2 x 2 stage actors (one of them killed)
    # and the student in an actor of its own. The uninterrupted 2 x 2 case is BBT's (same pool).
    before = kill_mid_run([*GDFO, *small, "--local"], killed)
    killed.rename(moved)
    resumed = run(GDFO, *small, *RESUME_CHANGES, "--resume", "--output-dir", moved)
    check_resume_changes(moved / "config.json", json.loads((moved / "result.json").read_text()), RESULT_NEUTRAL_FIELDS)
    after = (moved / "log.jsonl").read_text().splitlines()
    kept = len(after) - sum(line.startswith("gen ") for line in resumed.stdout.splitlines())
    assert 1 <= kept <= len(before) and after[:kept] == before[:kept]  # continued, not restarted
    for name in ("best_prompt.safetensors", "student/model.safetensors"):
        assert (one / name).read_bytes() == (moved / name).read_bytes(), name
    assert metrics(one) == metrics(moved)
    assert len(after) == len((one / "log.jsonl").read_text().splitlines())
    result = json.loads((one / "result.json").read_text())
    assert result["injected_points"] > 0 and -1 <= result["student_agreement_mean"] <= 1
    assert result["guided_points_per_generation"] == 4 and 0 <= result["generations_won_by_guided_points"] <= 12


def test_gradient_only_names_no_optimizer_and_wins_nothing_by_construction(tmp_path):
    # the ablation asks no optimizer: every point it scores is a gradient point, so no generation
    # counts as "won by gradient points", and its result must not say cma
    out = tmp_path / "gradient"
    done = run_in_process("jobs/gdfo.py", [*SMALL_GDFO, "--local", "--variant", "gradient", "--output-dir", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["optimizer"] == "none" and result["method"] == "gdfo-gradient-only"
    assert result["generations_won_by_gradient_points"] is None and result["injected_points"] > 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(row["injected"] for row in rows) == result["injected_points"]
    assert not any(row["injected_won"] for row in rows)


def student_with_another_tokenizer(tmp_path) -> Path:
    """A tiny Llama whose tokenizer splits every label word of the default task."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x): return x"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    directory = tmp_path / "student"
    LlamaForCausalLM(LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def test_bad_input(tmp_path):
    def gdfo(*args):  # main in this process, Ray guarded
        return run_in_process("jobs/gdfo.py", ["--quick", *args, "--output-dir", tmp_path / "o"])

    assert_one_line_error(gdfo("--student", tmp_path / "nope"), "does not exist")
    assert_one_line_error(gdfo("--temperature", "0"), "--temperature")
    assert_one_line_error(gdfo("--student-lr", "-0.1"), "--student-lr")
    assert_one_line_error(gdfo("--guided-share", "1"), "--guided-share", "[0, 1)")
    assert_one_line_error(gdfo("--guided-share", "0.1"), "--guided-share", "antithetic pair")
    assert_one_line_error(gdfo("--guided-share", "0.4", "--optimizer", "TwoPointsDE"), "--guided-share", "cma")
    assert_one_line_error(gdfo("--student", student_with_another_tokenizer(tmp_path)), "--student", "exactly one token")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", [0, 3])
def test_injected_points_move_the_cma_mean_toward_them(seed):
    # What GDFO's step does (raydapt/gdfo/search.py): tell CMA-ES the asked population plus the
    # student's gradient points, with the teacher's losses. Same seed, same population, with and
    # without the injected points: the mean must differ, and the shift point toward them.
    import numpy as np

    from raydapt.search.optimizers import CMAOptimizer

    d = 5
    with_points, without = CMAOptimizer(d, 6, 0.5, seed=seed), CMAOptimizer(d, 6, 0.5, seed=seed)
    X = with_points.ask()
    assert np.array_equal(X, without.ask())
    target = np.ones(d) / np.sqrt(d)
    injected = np.stack([0.6 * target, 0.8 * target])             # (2, d): better than any asked point
    loss = lambda Z: ((Z - target) ** 2).sum(-1)                   # noqa: E731
    assert loss(injected).max() < loss(X).min()
    with_points.tell(np.vstack([X, injected]), np.concatenate([loss(X), loss(injected)]))
    without.tell(X, loss(X))
    shift = with_points.mean() - without.mean()
    towards = injected.mean(0) - without.mean()
    assert np.linalg.norm(shift) > 0.1 * np.linalg.norm(towards)
    assert shift @ towards / (np.linalg.norm(shift) * np.linalg.norm(towards)) > 0.9
    assert np.linalg.norm(with_points.mean() - injected.mean(0)) < 0.5 * np.linalg.norm(towards)


def test_diagnose_gradient_measures_the_cosine_without_changing_the_search(tmp_path):
    small = [*SMALL_GDFO, "--local", "--trust", "always"]
    for name, extra in (("plain", []), ("diagnosed", ["--diagnose-gradient"])):
        done = run_in_process("jobs/gdfo.py", [*small, *extra, "--output-dir", str(tmp_path / name)])
        assert done.returncode == 0, done.stderr[-2000:]
    plain, diagnosed = tmp_path / "plain", tmp_path / "diagnosed"
    assert (plain / "best_prompt.safetensors").read_bytes() == (diagnosed / "best_prompt.safetensors").read_bytes()
    result = json.loads((diagnosed / "result.json").read_text())
    assert json.loads((plain / "result.json").read_text())["gradient_cosine_mean"] is None
    assert result["white_box_loss_gap"] < 1e-4  # the white box is the oracle's model: same loss
    cosines = [json.loads(line)["gradient_cosine"] for line in (diagnosed / "log.jsonl").read_text().splitlines()
               if "gradient_cosine" in line]
    assert len(cosines) == result["generations"] and all(-1 <= c <= 1 for c in cosines) and len(set(cosines)) > 1
    assert result["gradient_cosine_mean"] == pytest.approx(sum(cosines) / len(cosines))


@pytest.mark.parametrize("seed", [0, 1])
def test_guided_samples_along_the_true_gradient_speed_cma_up_and_an_orthogonal_guide_does_not(seed):
    # What --guided-share does each generation: the last 4 of CMA-ES's 10 points become antithetic
    # samples in the guide's span. On f(z) = |z - t|^2 in d = 50, 15 generations from 0:
    # plain CMA-ES ends at f ~ 8-10, guided by the true gradient at f < 1, guided by a direction
    # orthogonal to it (no information) no better than plain.
    import numpy as np

    from raydapt.gdfo.search import guided_samples
    from raydapt.search.optimizers import CMAOptimizer

    d, target = 50, np.eye(50)[0] * 3.0
    f = lambda Z: ((Z - target) ** 2).sum(-1)  # noqa: E731

    def final_loss(guide):
        opt, rng = CMAOptimizer(d, 10, 0.5, seed=seed), np.random.default_rng(seed)
        for _ in range(15):
            X, m = opt.ask(), opt.mean()
            if guide is not None:
                X = np.concatenate([X[:6], guided_samples(m, opt.sample_std(), guide(m)[None], 4, rng)])
            opt.tell(X, f(X))
        return float(f(opt.mean()[None])[0])

    def orthogonal(m):
        v = np.random.default_rng(seed).standard_normal(d)
        return v - v @ (m - target) / ((m - target) @ (m - target)) * (m - target)

    plain, guided, useless = final_loss(None), final_loss(lambda m: 2 * (m - target)), final_loss(orthogonal)
    assert guided < 0.1 * plain and useless > 0.5 * plain, (plain, guided, useless)
    X = guided_samples(np.ones(d), 0.5, np.eye(d)[:2], 6, np.random.default_rng(seed))
    assert np.allclose(X[:3] - 1, -(X[3:] - 1)) and np.allclose(X[:, 2:], 1)  # antithetic, in the span
