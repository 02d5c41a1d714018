"""CombLM: domains and splits, a small job's findings, a job killed mid-phase and resumed (with a
Ray Train worker killed) that equals the uninterrupted one, and bad input."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from raydapt.comblm.domains import build_splits, split_blocks
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from tests.entry_points import assert_one_line_error, run_in_process

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "comblm.py")]


def run_job(*args, timeout=900):
    return subprocess.run([*JOB, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def split_config(**kw):
    base = dict(target="", general="", seed=0, block=64, train_tokens=0, fit_tokens=0, test_tokens=2000,
                fit_mix=0.0, combiner_batch=256)
    return SimpleNamespace(**(base | kw))


def test_split_blocks_are_contiguous_and_cover_every_row():
    blocks = np.arange(40).reshape(20, 2)
    parts = split_blocks(blocks, {"a": 0.5, "b": 0.25, "c": 0.25}, "target")
    assert [len(p) for p in parts.values()] == [10, 5, 5]
    assert np.array_equal(np.concatenate(list(parts.values())), blocks)


def test_default_domains_split_and_the_fit_mix_takes_general_rows():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("large"))
    pure = build_splits(split_config(), tokenizer)
    mixed = build_splits(split_config(fit_mix=0.5), tokenizer)
    assert len(pure["fit"]) == len(mixed["fit"]) == len(pure["target_fit"])
    half = len(pure["fit"]) - round(0.5 * len(pure["fit"]))
    assert np.array_equal(mixed["fit"][:half], pure["target_fit"][:half])
    assert np.array_equal(mixed["fit"][half:], pure["general_fit"][: len(pure["fit"]) - half])
    # The target splits do not share rows (the expert never trains on the fit or test set).
    seen = {r.tobytes() for r in pure["expert_train"]}
    assert not any(r.tobytes() in seen for r in pure["target_test"])


def test_fit_set_smaller_than_one_batch_is_refused(tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("large"))
    (tmp_path / "tiny.txt").write_text("def f():\n    return 1\n" * 80)
    with pytest.raises(UserError, match="fewer than one combiner batch"):
        build_splits(split_config(target=str(tmp_path / "tiny.txt"), combiner_batch=1024), tokenizer)


def different_tokenizer_model(tmp_path) -> Path:
    """The default small model with a tokenizer of its own (trained here on a few lines)."""
    from raydapt.pretrain import train_tokenizer
    directory = tmp_path / "other"
    shutil.copytree(default_model_dir("small"), directory)
    tokenizer = train_tokenizer(["def other(x):\n    return x * 2\n"] * 50, vocab_size=300, context=256)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case", ["tokenizer", "empty", "combiner", "small_fit"])
def test_bad_input_gives_one_clear_line(tmp_path, case):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n" * 300)
    args, fragments = {
        "tokenizer": (["--expert", different_tokenizer_model(tmp_path)], ["different tokenizer", "one vocabulary"]),
        "empty": (["--target", empty], ["--target", "holds no text"]),
        "combiner": (["--combiners", "mean,entropy_scaler"], ["--combiners", "entropy_scaler", "entropy_scalar"]),
        "small_fit": (["--target", small], ["fewer than one combiner batch"]),
    }[case]
    result = run_in_process("jobs/comblm.py", ["--output-dir", out, *args])  # Ray guarded
    assert_one_line_error(result, *fragments)
    assert not out.exists(), f"{out} was written before the input was checked"


# Mechanics and a small-scale finding: small splits, few steps, every combiner. The quick preset's
# findings (3 seeds) are suite runs reported in RESULTS.md, not tests.
SMALL = ["--quick", "--seed", "4", "--train-tokens", "6000", "--fit-tokens", "3000", "--test-tokens", "1500",
         "--expert-steps", "12", "--checkpoint-every", "2", "--combiner-epochs", "1", "--hidden", "16",
         "--control", "constant_scalar"]
# Every field CombLM's --resume accepts, changed between the killed leg and the resumed one.
# The worker fault's step is chosen after the kill (fault_after_restore).
RESUME_CHANGES = ["--stages", "2", "--replicas", "2", "--cpus-per-stage", "0.5", "--micro-batch", "3",
                  "--combiner-workers", "1"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """One uninterrupted SMALL job on Ray (~100 s on 2 cores): the findings test reads it and the
    kill/resume test compares bytes with it."""
    out = tmp_path_factory.mktemp("comblm") / "clean"
    result = run_job(*SMALL, "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.cluster
@pytest.mark.slow
def test_small_job_learns_combiners_that_beat_both_models(small_run, tmp_path):
    out = small_run
    r = json.loads((out / "result.json").read_text())
    ppl = r["perplexity"]
    keys = {"large", "expert", "expert_untuned", "mean", "constant_scalar", "constant_vector", "entropy_scalar",
            "entropy_vector", "full_scalar", "full_vector", "proxy_tuning", "max_prob_oracle"}
    assert keys <= set(ppl) and keys <= set(r["general_perplexity"])
    assert ppl["expert"] < ppl["expert_untuned"]  # 12 steps of fine-tuning already help on the target
    best_single = min(ppl["large"], ppl["expert"])
    learned = keys - {"large", "expert", "expert_untuned", "mean", "proxy_tuning", "max_prob_oracle"}
    assert all(ppl[k] < best_single for k in learned), ppl
    assert r["learned_combiners_beat_both_models"]
    assert all(ppl["max_prob_oracle"] < v for k, v in ppl.items() if k != "max_prob_oracle")
    # The control: mixing in the un-fine-tuned small model gains little over the large model.
    assert r["control"]["constant_scalar"] > 0.95 * ppl["large"]
    # Expert fine-tuning and black-box scoring overlapped; the combiners were fitted concurrently.
    phases = r["timeline"]["phases"]
    train, score = phases["expert_fine_tuning"], phases["large_lm_scoring"]
    assert score[0] < train[1] and train[0] < score[1]
    fits = [v for k, v in phases.items() if k.startswith("fit:")]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(fits) for b in fits[i + 1:])
    assert (out / "perplexity.png").stat().st_size > 0
    assert (out / "expert" / "model.safetensors").exists()
    check_combined_model_scores_and_generates(out, tmp_path)
    # --resume on a finished run keeps every phase's output and gives the same numbers.
    again = run_job(*SMALL, "--output-dir", out, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["perplexity"] == ppl


def check_combined_model_scores_and_generates(run: Path, tmp_path: Path) -> None:
    """`raydapt score --combine` writes the mixed log-probs; `raydapt generate` samples from the mix."""
    import pyarrow.parquet as pq
    from raydapt.comblm.domains import load_split
    test = load_split(run / "data" / "target_test.parquet")[:4]
    corpus = tmp_path / "target.jsonl"
    corpus.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in test))
    scored = tmp_path / "scored.parquet"
    cli = ["-m", "actors.cli"]  # in this process, Ray guarded: both commands serve the models locally
    result = run_in_process(cli, ["score", "--local", "--combine", run, "--combiner", "entropy_scalar",
                                  "--input", corpus, "--output", scored])
    assert result.returncode == 0, result.stderr[-2000:]
    table = pq.read_table(scored).to_pydict()
    combined, large = np.array(table["combined_logprob"]), np.array(table["logprob"])
    assert len(combined) == test.size - len(test) and np.isfinite(combined).all()
    assert combined.mean() > large.mean()  # on target text the mix beats the large LM alone
    generate = ["generate", "--run", run, "--prompt", "The with statement", "--max-new-tokens", "8", "--seed", "1"]
    first, second = (run_in_process(cli, generate) for _ in range(2))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("The with statement") and len(first.stdout) > len("The with statement")
    assert first.stdout == second.stdout  # seeded sampling


def kill_job_and_its_ray(proc: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started, as a machine that dies. Its process group is not
    enough: Ray's workers run in groups of their own and, orphaned, kept training and writing
    checkpoints for seconds (seen: steps 4 and 6 after a kill at step 2)."""
    import os
    import signal

    import psutil
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def kill_mid_expert_training(out: Path) -> None:
    """Start the job, SIGKILL it and what it started once Ray Train has written its first expert
    checkpoint, before the expert or any combiner is complete."""
    import time
    proc = subprocess.Popen([*JOB, *SMALL, "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((out / "train").glob("expert/checkpoint_*")):
        assert proc.poll() is None, "the job ended before it was killed"
        time.sleep(0.1)
    kill_job_and_its_ray(proc)
    assert not (out / "expert").exists() and not (out / "result.json").exists()


def fault_after_restore(out: Path) -> list[str]:
    """A worker fault one step after the newest checkpoint the killed leg left, so that it fires
    whichever checkpoint Ray Train restores: how far the leg got before SIGKILL is a race."""
    steps = [json.loads(p.read_text())["step"] for p in (out / "train").glob("expert/checkpoint_*/state.json")]
    latest = max(steps, default=0)
    assert latest < int(SMALL[SMALL.index("--expert-steps") + 1]), "the killed leg finished fine-tuning"
    return ["--fault-injection", f"kill-worker:after-steps={latest + 1}"]


@pytest.mark.cluster
@pytest.mark.slow
def test_killed_mid_phase_and_resumed_with_every_neutral_field_changed_equals_uninterrupted(small_run, tmp_path):
    """Killed mid expert fine-tuning, then resumed with every neutral field changed and a Ray Train
    worker killed one step after the resume point (restored from its last checkpoint): the same bytes
    as the clean run."""
    from raydapt.comblm.config import RESULT_NEUTRAL_FIELDS
    clean, killed = small_run, tmp_path / "killed"
    kill_mid_expert_training(killed)
    resumed = run_job(*SMALL, *RESUME_CHANGES, *fault_after_restore(killed), "--output-dir", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((d / "result.json").read_text()) for d in (clean, killed))
    first_leg = json.loads((killed / "config.json").read_text())  # written by the killed leg, kept
    changed = {k for k in b["config"] if first_leg.get(k) != b["config"][k]}
    assert changed == set(RESULT_NEUTRAL_FIELDS), changed ^ set(RESULT_NEUTRAL_FIELDS)
    assert b["worker_failures_injected"] == 1
    for key in ("perplexity", "general_perplexity", "expert_final_train_loss", "combiner_fit_losses", "tokens"):
        assert a[key] == b[key], key
    for name in ("expert/model.safetensors", "combiners/entropy_scalar.safetensors",
                 "combiners/constant_scalar+untuned.safetensors", "cache/large-fit.safetensors"):
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name
