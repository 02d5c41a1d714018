"""Reading Hugging Face checkpoint directories: config, tensor index, selected tensors.

Weights load only from safetensors: pickle-based `.bin` files can run code when loaded, and an
oracle serving a cluster must not trust them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from raydapt.errors import UserError
from raydapt.models.families import SUPPORTED_MODEL_TYPES, Family, family_for

__all__ = ["read_config", "tensor_index", "load_tensors"]


def read_config(model_dir: str | Path) -> tuple[PretrainedConfig, Family]:
    """The checkpoint's config and family, or a UserError saying what is wrong with the directory."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"checkpoint directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e.msg})")
    family = family_for(model_type or "")
    if family is None:
        raise UserError(f"unsupported architecture {model_type!r} in {path / 'config.json'}; "
                        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return AutoConfig.from_pretrained(path), family


def tensor_index(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it."""
    path = Path(model_dir)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise UserError(f"no safetensors weights in {path} (expected model.safetensors or "
                        "model.safetensors.index.json; pickle .bin files are not loaded)")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"corrupted safetensors file {single}: {e}")


def load_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Load only `names`, opening each file once; corrupted files raise a UserError."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(f"corrupted safetensors file {file}: {e}")
    return out
