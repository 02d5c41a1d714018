"""Bad input to `raydapt score`: one clear line on stderr, exit status 2, no traceback, no output."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

RAYDAPT = [sys.executable, "-m", "raydapt.cli"]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2, 3, 4]}) + "\n")
    return path


def run_score(*args):
    return subprocess.run([*RAYDAPT, "score", "--local", *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last, last


def bad_checkpoint(tmp_path, tiny_checkpoints, kind):
    directory = tmp_path / kind
    if kind == "missing":
        return directory
    shutil.copytree(tiny_checkpoints["llama"][0], directory)
    if kind == "bert":
        (directory / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    elif kind == "garbage":
        (directory / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif kind == "truncated":
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    return directory


@pytest.mark.parametrize("kind, fragments", [
    ("missing", ["does not exist"]),
    ("bert", ["unsupported architecture 'bert'", "gpt2, opt, llama, mistral, qwen2"]),
    ("garbage", ["corrupted safetensors file"]),
    ("truncated", ["corrupted safetensors file"]),
])
def test_bad_checkpoints(tmp_path, tiny_checkpoints, corpus, kind, fragments):
    out = tmp_path / "out.parquet"
    result = run_score("--model", bad_checkpoint(tmp_path, tiny_checkpoints, kind), "--input", corpus, "--output", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("lines, fragments", [
    (['{"input_ids": [1, 2, 3]}', '{"input_ids": [1, 2'], ["line 2: not valid JSON"]),
    (['{"tokens": [1, 2]}'], ["line 1: needs a \"text\"", "\"input_ids\""]),
    ([json.dumps({"input_ids": list(range(65))})], ["line 1: 65 tokens, longer than the model's context of 64"]),
])
def test_bad_corpus_lines(tmp_path, tiny_checkpoints, lines, fragments):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    result = run_score("--model", tiny_checkpoints["llama"][0], "--input", corpus, "--output", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_more_stages_than_layers(tmp_path, tiny_checkpoints, corpus):
    result = run_score("--model", tiny_checkpoints["gpt2"][0], "--stages", 5, "--input", corpus,
                       "--output", tmp_path / "o.parquet")
    assert_one_line_error(result, "--stages 5", "4 layers")


def test_output_that_cannot_be_written(tmp_path, tiny_checkpoints, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_score("--model", tiny_checkpoints["gpt2"][0], "--input", corpus, "--output", blocker / "o.parquet")
    assert_one_line_error(result, "--output", "does not exist")


def test_unknown_flag_and_command(tmp_path):
    result = subprocess.run([*RAYDAPT, "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr
    result = run_score("--input", tmp_path / "x.jsonl", "--output", tmp_path / "o.parquet", "--top-k", "-1")
    assert_one_line_error(result, "--top-k")
