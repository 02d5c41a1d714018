"""jobs/gdfo.py end to end: the black-box boundary, GDFO without trust equals BBT, resume and
invariance, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bbt_job import SMALL, assert_one_line_error, metrics

ROOT = Path(__file__).resolve().parents[1]
GDFO = [sys.executable, str(ROOT / "jobs" / "gdfo.py")]
BBT = [sys.executable, str(ROOT / "jobs" / "bbt.py")]
SMALL_GDFO = [*SMALL, "--baseline", "none"]


def run(cmd, *args, check=True):
    result = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.cluster
@pytest.mark.slow
def test_teacher_weights_never_leave_the_stage_actors(tmp_path):
    result = run([sys.executable, str(ROOT / "tests" / "gdfo_audit.py")], tmp_path / "audit")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["teacher_shapes"]  # e.g. (4096, 256) embeddings, (256, 256) projections
    assert report["coordinator"] == [] and report["student"] == []
    assert report["student_pid"] != os.getpid() and report["api_calls"] > 0


@pytest.mark.slow
def test_gdfo_that_never_trusts_its_student_is_bbt(tmp_path):
    run(BBT, *SMALL, "--local", "--output-dir", tmp_path / "bbt")
    run(GDFO, *SMALL_GDFO, "--local", "--trust", "never", "--output-dir", tmp_path / "gdfo")
    assert (tmp_path / "bbt" / "best_prompt.safetensors").read_bytes() == \
        (tmp_path / "gdfo" / "best_prompt.safetensors").read_bytes()
    gdfo = json.loads((tmp_path / "gdfo" / "result.json").read_text())
    assert gdfo["injected_points"] == 0 and gdfo["method"] == "gdfo"
    assert (tmp_path / "gdfo" / "student" / "model.safetensors").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_gdfo_same_on_1x1_and_2x2_and_after_resume(tmp_path):
    import signal
    import time

    one, four, killed = tmp_path / "r1s1", tmp_path / "r2s2", tmp_path / "killed"
    run(GDFO, *SMALL_GDFO, "--output-dir", one)
    run(GDFO, *SMALL_GDFO, "--replicas", 2, "--stages", 2, "--output-dir", four)
    # Killed and resumed on Ray too: runs are compared within one backend (in-process runs can take
    # other float paths than actors, whose thread settings Ray fixes).
    proc = subprocess.Popen([*GDFO, *SMALL_GDFO, "--output-dir", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run(GDFO, *SMALL_GDFO, "--resume", "--output-dir", killed)
    for other in (four, killed):
        assert (one / "best_prompt.safetensors").read_bytes() == (other / "best_prompt.safetensors").read_bytes()
        assert metrics(one) == metrics(other)
    result = json.loads((one / "result.json").read_text())
    assert result["injected_points"] > 0 and -1 <= result["student_agreement_mean"] <= 1


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
    out = ["--local", "--output-dir", tmp_path / "o"]
    assert_one_line_error(run(GDFO, "--quick", "--student", tmp_path / "nope", *out, check=False), "does not exist")
    assert_one_line_error(run(GDFO, "--quick", "--temperature", "0", *out, check=False), "--temperature")
    assert_one_line_error(run(GDFO, "--quick", "--student-lr", "-0.1", *out, check=False), "--student-lr")
    result = run(GDFO, "--quick", "--student", student_with_another_tokenizer(tmp_path), *out, check=False)
    assert_one_line_error(result, "--student", "exactly one token")
    assert not (tmp_path / "o").exists()
