"""Shared fixtures: tiny random checkpoints of every supported family, and one local Ray cluster.

The cluster is started in a temporary directory by this test session and stopped with
`ray.shutdown()`, which ends exactly the processes it started and nothing else on the machine.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

# Ray Train's controller looks at its workers every 2 s by default, so each of the suite's short Train
# runs (and each phase after a killed worker) ends up to 2 s after its work; jobs started by the tests
# and the session's cluster inherit this. It changes when a run is noticed to end, never its numbers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

TINY = dict(vocab=128, width=32, layers=4, heads=4, context=64)


def tiny_config(family: str):
    v, w, n, h, c = TINY["vocab"], TINY["width"], TINY["layers"], TINY["heads"], TINY["context"]
    if family == "gpt2":
        return GPT2Config(vocab_size=v, n_embd=w, n_layer=n, n_head=h, n_positions=c)
    if family == "opt":
        return OPTConfig(vocab_size=v, hidden_size=w, num_hidden_layers=n, num_attention_heads=h, ffn_dim=2 * w,
                         max_position_embeddings=c, word_embed_proj_dim=w)
    common = dict(vocab_size=v, hidden_size=w, num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=2,
                  intermediate_size=2 * w, max_position_embeddings=c)
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=True, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=c, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(family)


FAMILIES = ("gpt2", "opt", "llama", "mistral", "qwen2")


def make_checkpoint(family: str, directory, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa").eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """{family: (directory, the Hugging Face model)} for the five supported families."""
    root = tmp_path_factory.mktemp("ckpt")
    return {f: (root / f, make_checkpoint(f, root / f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # A short path: Ray's Unix sockets live under the temp dir and have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="rdpt-", dir="/tmp")
    # Logical CPUs: 3 stages x 2 replicas must fit on a 2-core machine (the stages take turns).
    ray.init(address="local", num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, logging_level="ERROR")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)  # logs and spilled objects: tens of MB a session


@pytest.fixture(scope="session")
def bbt_small_run(tmp_path_factory):
    """jobs/bbt.py on the tests' small preset, in process and uninterrupted: the reference that the
    BBT runs on Ray actors, killed and resumed, and GDFO without trust must equal byte for byte.
    Run once per session (each run is a fresh interpreter, ~20 s)."""
    from tests.test_bbt_job import SMALL, run_job
    out = tmp_path_factory.mktemp("bbt") / "whole"
    run_job(*SMALL, "--local", "--output-dir", out)
    return out
