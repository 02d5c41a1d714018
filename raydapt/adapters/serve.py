"""Serving an extended model sharded (`raydapt score --adapters`): an adapters file checked against a
backbone before any stage starts, then each stage's own blocks extended with their own adapters.

The file is the `adapters.safetensors` that jobs/extend.py writes: the trained tensors under the
extended model's names (`model.layers.3.residual_adapter.w_i.weight`), and in its header the adapter
config (with the backbone's recorded type and sizes) and the backbone directory. It is read with
safetensors only (no code runs), and a stage reads only its own blocks' tensors.

Gated and vanilla adapters are served this way. LoRA and full fine-tuning change the backbone's own
weights: `python -m raydapt.extend.export RUN OUT` writes them as an ordinary merged checkpoint,
served with `--model OUT` and no adapters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raydapt.adapters.attach import ADAPTER_NAME, FFN_SITES, attach_to_blocks, backbone_parameters, base_record
from raydapt.adapters.config import GATED, AdapterConfig
from raydapt.adapters.layers import GatedResidual, adapter_width
from raydapt.errors import UserError

__all__ = ["ServedAdapters", "check_adapters", "adapters_file", "attach_to_shard", "SERVABLE"]

ADAPTERS_FILE = "adapters.safetensors"
SERVABLE = GATED + ("adapter",)  # attached to the stages; LoRA and full are merged checkpoints


@dataclass(frozen=True)
class ServedAdapters:
    """A checked adapters file: where it is, its config, and the backbone directory it records."""
    path: str
    config: AdapterConfig
    base: str


def adapters_file(path: str | Path) -> Path:
    """A jobs/extend.py run directory or its adapters file -> the file (UserError if neither)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTERS_FILE
        if not path.is_file():
            raise UserError(f"--adapters: {path.parent} holds no {ADAPTERS_FILE}; give a finished jobs/extend.py "
                            "run directory or the file itself")
    elif not path.is_file():
        raise UserError(f"--adapters: {path} does not exist")
    return path


def _header(path: Path) -> tuple[AdapterConfig, dict, dict[str, tuple[int, ...]]]:
    """(config, header record, {tensor name: shape}) without reading a tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta, shapes = f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--adapters: {path} is not a readable safetensors file ({str(e).splitlines()[0]})")
    try:
        record = json.loads(meta["raydapt"])
        config = AdapterConfig.from_json(record["adapter_config"])
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"--adapters: {path} carries no adapter config in its header ({type(e).__name__}: {e}); "
                        "it was not written by jobs/extend.py")
    return config, record, shapes


def _skeleton(model_dir: str):
    from transformers import AutoModelForCausalLM

    from raydapt.models.checkpoint import read_config
    config, _ = read_config(model_dir)
    with torch.device("meta"):  # shapes only: the base record and the adapter shapes need no weights
        return AutoModelForCausalLM.from_config(config)


def check_adapters(path: str | Path, model_dir: str | None = None) -> ServedAdapters:
    """Every check `--adapters` needs, before a stage starts: the file is an adapters file of a
    servable method, was trained on `model_dir` (default: the backbone it records) by its recorded
    base, and holds exactly one adapter per block, of the shapes that backbone gives it."""
    file = adapters_file(path)
    config, record, shapes = _header(file)
    if config.method not in SERVABLE:
        raise UserError(f"--adapters: {file} holds {config.method}, which changes the backbone's own weights; "
                        f"export it as a merged checkpoint (python -m raydapt.extend.export {file.parent} OUT_DIR) "
                        "and score that with --model OUT_DIR, without --adapters")
    base = model_dir or record.get("model", "")
    if not model_dir and not (base and Path(base).is_dir()):
        raise UserError(f"--adapters: the backbone {file} records ({base or 'none'}) is not here; give it with --model")
    skeleton = _skeleton(str(base))
    if config.base_model and json.loads(config.base_model) != json.loads(base_record(skeleton)):
        raise UserError(f"--adapters: {file} was trained on another backbone ({config.base_model}); "
                        f"--model {base} is {base_record(skeleton)}")
    expected = _expected_shapes(skeleton, config)
    wrong = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))
    if wrong:
        k = wrong[0]
        raise UserError(f"--adapters: {file} does not fit the backbone {base}: {len(wrong)} tensors differ, e.g. "
                        f"{k} is {shapes.get(k, 'absent')} in the file and {expected.get(k, 'absent')} in the model")
    return ServedAdapters(str(file.resolve()), config, str(base))


def _expected_shapes(skeleton: nn.Module, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every adapter tensor this backbone extended by `config.method` at
    `config.extra_params` has."""
    model_type = skeleton.config.model_type
    if model_type not in FFN_SITES:
        raise UserError(f"--adapters: unsupported architecture {model_type!r}; supported: {', '.join(FFN_SITES)}")
    prefix, d = FFN_SITES[model_type][0], skeleton.config.hidden_size
    blocks = len(skeleton.get_submodule(prefix))
    # The width attach gives this backbone at the file's --extra-params, not the width the file says.
    hidden = adapter_width(backbone_parameters(skeleton), blocks, d, config.extra_params)
    with torch.device("meta"):
        one = GatedResidual(d, hidden, blocks, config.gate, config.init, config.activation)
    return {f"{prefix}.{i}.{ADAPTER_NAME}.{k}": tuple(v.shape) for i in range(blocks)
            for k, v in one.named_parameters()}


def attach_to_shard(shard: nn.Module, path: str, model_type: str, d: int) -> None:
    """Extend a pipeline stage's blocks (`raydapt.models.shard.Shard`) by their trained adapters,
    in the shard's dtype and device. Reads only these blocks' tensors from the (checked) file."""
    from safetensors import safe_open

    config, _, _ = _header(Path(path))
    prefix = FFN_SITES[model_type][0]
    blocks = dict(zip(shard.layers, shard.blocks))
    wanted = tuple(f"{prefix}.{i}.{ADAPTER_NAME}." for i in blocks)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
    # attach_to_blocks draws a throwaway init before loading the trained tensors: keep the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        attach_to_blocks(blocks, model_type, d, config, tensors)
    ref = next(shard.parameters())
    for block in blocks.values():
        block.get_submodule(ADAPTER_NAME).to(device=ref.device, dtype=ref.dtype)

