"""`raydapt score --adapters`: a frozen LM extended by trained adapters, served on the stages (in this
process and as Ray actors) with the log-probs of the extended Hugging Face model run in one process.

The adapters are written as jobs/extend.py writes them (`adapters.safetensors`, the adapter config
and the backbone in its header), with every weight drawn at random: W_o is zero at init, and an
extension that changes nothing would pass any parity test.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actors.cli import main as raydapt_main
from raydapt.adapters import AdapterConfig, adapters_of, trainable_state
from raydapt.adapters.serve import check_adapters
from raydapt.errors import UserError
from raydapt.extend.export import load_run
from raydapt.extend.job import ADAPTERS_FILE, load_extended
from raydapt.outputs import save_tensors
from tests.conftest import tiny_config

RNG = np.random.default_rng(3)
DOCS = [RNG.integers(0, 128, n).tolist() for n in (5, 17, 2, 40, 9, 23)]
# (family, method): a ReLU gate, a sigmoid gate with its bias, no gate; OPT's FFN is fc1..fc2.
CASES = [("llama", "neutral"), ("gpt2", "neutral-sigmoid"), ("opt", "adapter")]


def two_layer_checkpoint(family: str, directory: Path, seed: int = 0, **changes) -> Path:
    """A tiny checkpoint of 2 blocks of width 32 (the shared fixtures have 4)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.num_hidden_layers = 2  # GPT-2's n_layer too (an alias)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(directory)
    return directory


def write_adapters(model_dir: Path, run_dir: Path, method: str = "neutral", seed: int = 0,
                   record_base: bool = True) -> Path:
    """A run directory holding adapters.safetensors as jobs/extend.py writes it, weights at random."""
    model, cfg = load_extended(str(model_dir), AdapterConfig(method=method), None, seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for adapter in adapters_of(model):
            for p in adapter.parameters():
                p.normal_(0.0, 0.3)
    if not record_base:
        cfg = AdapterConfig(**{**cfg.__dict__, "base_model": ""})
    meta = {"adapter_config": cfg.to_json(), "model": str(Path(model_dir).resolve()), "method": method,
            "seed": str(seed)}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(run_dir / ADAPTERS_FILE, {k: v.numpy() for k, v in trainable_state(model).items()}, metadata=meta)
    return run_dir


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> dict:
    """{(family, method): (backbone dir, run dir)} on 2-layer checkpoints."""
    root = tmp_path_factory.mktemp("extended")
    return {(f, m): (two_layer_checkpoint(f, root / f), write_adapters(root / f, root / f"{f}-{m}", m))
            for f, m in CASES}


def reference(model_dir: Path, run_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per document: log p(x_t | x_<t) under the extended HF model in this process, and the backbone's."""
    extended_model, _ = load_run(run_dir / ADAPTERS_FILE, str(model_dir))
    backbone, _ = load_extended(str(model_dir), AdapterConfig(method="full"), None)

    def logprobs(model, doc):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([doc])).logits[0].float(), -1)
        return logp[torch.arange(len(doc) - 1), torch.tensor(doc[1:])].numpy()

    return [logprobs(extended_model, d) for d in DOCS], [logprobs(backbone, d) for d in DOCS]


def score(tmp_path: Path, run_dir: Path, stages: int, extra=()) -> list[np.ndarray]:
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in DOCS))
    out = tmp_path / f"out-{stages}-{len(extra)}.parquet"
    raydapt_main(["score", "--adapters", str(run_dir), "--stages", str(stages), "--input", str(corpus),
                  "--output", str(out), "--micro-batch", "4", *extra])
    table = pq.read_table(out).to_pandas()
    assert len(table) == sum(len(d) - 1 for d in DOCS)
    return [table[table.doc == i].sort_values("pos").logprob.to_numpy() for i in range(len(DOCS))]


def max_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want) if len(w))


@pytest.mark.parametrize("family,method", CASES)
def test_local_stages_match_the_extended_model(tmp_path, extended, family, method):
    model_dir, run_dir = extended[(family, method)]
    want, backbone = reference(model_dir, run_dir)
    assert max_error(want, backbone) > 1e-2  # the extension changes the answers: parity means something
    for stages in (1, 2):
        # --model defaults to the backbone the file records; given, it must be that backbone.
        extra = ["--local"] + (["--model", str(model_dir)] if stages == 2 else [])
        got = score(tmp_path, run_dir / ADAPTERS_FILE if stages == 1 else run_dir, stages, extra)
        assert max_error(got, want) < 1e-5, (stages, max_error(got, want))


@pytest.mark.cluster
def test_stage_actors_match_the_extended_model(tmp_path, extended, ray_cluster):
    model_dir, run_dir = extended[("llama", "neutral")]
    want, _ = reference(model_dir, run_dir)
    # S = 1 runs the same stage code in process above; on Ray, the shape with a stage boundary (each
    # stage actor attaches its own blocks' adapters), the real actors opened by `raydapt score`.
    # Replicas serve copies of one chain (tests/test_oracle.py): 2 actors here, not 4.
    got = score(tmp_path, run_dir, 2, ["--model", str(model_dir), "--cpus-per-stage", "0.5"])
    assert max_error(got, want) < 1e-5, max_error(got, want)


def test_check_adapters_refuses_another_backbone_by_record_and_by_shape(tmp_path, extended):
    model_dir, run_dir = extended[("llama", "neutral")]
    assert check_adapters(run_dir).base == str(model_dir.resolve())
    # Same names and width, a wider FFN: more backbone parameters, so wider adapters.
    other = two_layer_checkpoint("llama", tmp_path / "wider", intermediate_size=96)
    with pytest.raises(UserError, match="trained on another backbone"):
        check_adapters(run_dir, str(other))
    unrecorded = write_adapters(model_dir, tmp_path / "unrecorded", record_base=False)
    with pytest.raises(UserError, match=r"does not fit the backbone .*w_g.weight is \(\d+, 32\) in the file and "):
        check_adapters(unrecorded, str(other))


def test_the_stage_leaves_the_callers_random_state_alone(extended):
    from actors.pipeline import LocalPool
    from raydapt.serving import PoolSpec

    model_dir, run_dir = extended[("llama", "neutral")]
    torch.manual_seed(5)
    before = torch.get_rng_state()
    LocalPool(PoolSpec(str(model_dir), stages=2, adapters=str(run_dir / ADAPTERS_FILE)))
    assert torch.equal(torch.get_rng_state(), before)


def bad_adapter_inputs(tmp: Path, tiny_checkpoints) -> dict[str, Path]:
    """Adapter files `raydapt score --adapters` must refuse with the 4-layer tiny Llama as --model
    (tests/test_cli_errors.py's score rows)."""
    import shutil

    from safetensors.torch import save_file

    llama, gpt2, qwen2 = (tiny_checkpoints[f][0] for f in ("llama", "gpt2", "qwen2"))
    good = write_adapters(llama, tmp / "adapters-llama") / ADAPTERS_FILE
    garbage, truncated = tmp / "garbage.safetensors", tmp / "truncated.safetensors"
    headerless = tmp / "plain.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    save_file({"w": torch.zeros(2)}, str(headerless))
    (tmp / "empty-run").mkdir()
    gone = tmp / "moved-backbone"  # the adapters record a backbone directory that is then removed
    shutil.copytree(llama, gone)
    moved = write_adapters(gone, tmp / "adapters-moved")
    shutil.rmtree(gone)
    return {"adapters_gpt2": write_adapters(gpt2, tmp / "adapters-gpt2"),  # another backbone, by its record
            # another backbone with the same block names, its record removed: refused by shape
            "adapters_qwen2_unrecorded": write_adapters(qwen2, tmp / "adapters-qwen2", record_base=False),
            "adapters_lora": write_adapters(llama, tmp / "adapters-lora", "lora"),
            "adapters_garbage": garbage, "adapters_truncated": truncated, "adapters_headerless": headerless,
            "adapters_empty_run": tmp / "empty-run", "adapters_moved": moved}
