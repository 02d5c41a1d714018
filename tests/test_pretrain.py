"""The pretrain job end to end (--quick), the default model locations and the default task."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydapt.data.tasks import default_task, label_token_ids
from raydapt.defaults import assets_dir, default_model_dir
from tests.entry_points import assert_one_line_error, run_in_process

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "pretrain.py"


def _run_job(argv):
    runpy.run_path(str(JOB), run_name="pretrain_job")["main"](argv)


@pytest.fixture(scope="module")
def quick_builds(tmp_path_factory):
    """Two --quick builds with the same seed: one into $RAYDAPT_HOME, one into --output-dir."""
    home = tmp_path_factory.mktemp("home")
    other = tmp_path_factory.mktemp("other")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYDAPT_HOME", str(home))
        _run_job(["--quick", "--seed", "3"])
        _run_job(["--quick", "--seed", "3", "--output-dir", str(other)])
    return home / "models", other


def test_same_seed_gives_identical_safetensors(quick_builds):
    first, second = quick_builds
    for name in ("large", "small"):
        a = (first / name / "model.safetensors").read_bytes()
        assert a == (second / name / "model.safetensors").read_bytes()
        assert (first / name / "tokenizer.json").read_bytes() == (second / name / "tokenizer.json").read_bytes()
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temporary dirs left


def test_checkpoint_loads_with_auto_classes(quick_builds, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = quick_builds[0].parent
    monkeypatch.setenv("RAYDAPT_HOME", str(home))
    assert default_model_dir("large") == home / "models" / "large"
    large = AutoModelForCausalLM.from_pretrained(default_model_dir("large"), use_safetensors=True)
    small = AutoModelForCausalLM.from_pretrained(default_model_dir("small"), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(default_model_dir("small"))
    assert large.config.model_type == "llama" and large.config.num_hidden_layers == 4
    assert large.config.tie_word_embeddings
    assert tok.pad_token_id is not None and len(tok) == large.config.vocab_size
    ids = torch.tensor([tok.encode("import os\n", add_special_tokens=False)])
    assert large(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    n_large = sum(p.numel() for p in large.parameters())
    assert n_large > 2 * sum(p.numel() for p in small.parameters())


def test_default_model_dir_falls_back_to_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDAPT_HOME", str(tmp_path))
    assert default_model_dir("large") == assets_dir() / "models" / "large"
    assert (default_model_dir("large") / "config.json").is_file()


def _run_cli(*args):
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120)


BAD_INPUTS = [
    (["--output-dir", "{file}/sub"], "error: --output-dir: cannot write to"),
    (["--large-steps", "0"], "error: --large-steps: must be a positive integer, got 0"),
    (["--large-width", "-8"], "error: --large-width: must be a positive integer, got -8"),
]


def _assert_exits_2_with_one_line(result, message):
    assert_one_line_error(result)
    assert result.stderr.startswith(message)


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    """Each bad input, in this process with Ray guarded (tests/entry_points.py)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_in_process("jobs/pretrain.py", ["--quick", *[a.format(file=blocker) for a in args]])
    _assert_exits_2_with_one_line(result, message)


def test_bad_input_exits_2_from_the_script(tmp_path):
    """The first bad input as a real `python jobs/pretrain.py` subprocess: the script's own exit path
    (its imports print nothing, sys.exit(2) is the process's status)."""
    args, message = BAD_INPUTS[0]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _assert_exits_2_with_one_line(_run_cli("--quick", *[a.format(file=blocker) for a in args]), message)


def test_default_task_sizes():
    from transformers import AutoTokenizer

    task = default_task(seed=0, k=16)
    k_classes = len(task.verbalizer)
    assert 2 <= k_classes <= 4
    assert len(task.train) == len(task.dev) == 16 * k_classes
    assert not set(task.train["text"]) & set(task.dev["text"])
    assert not set(task.test["text"]) & (set(task.train["text"]) | set(task.dev["text"]))
    assert sorted(set(task.test["label"])) == list(range(k_classes))
    assert "{text}" in task.template
    tok = AutoTokenizer.from_pretrained(assets_dir() / "models" / "large")
    assert len(label_token_ids(tok, task.verbalizer)) == k_classes
