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
from raydapt.oracle import ModelInfo

__all__ = ["read_config", "model_info", "load_tokenizer", "tensor_index", "load_tensors", "HF_FILES",
           "save_optimizer_state", "load_optimizer_state", "optimizer_arrays", "optimizer_state"]

# The files of a Hugging Face checkpoint directory that raydapt copies (weights, config, tokenizer).
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")


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


def model_info(model_dir: str | Path) -> ModelInfo:
    """What an oracle over this checkpoint serves: layers, vocabulary, widths, usable context."""
    config, _ = read_config(model_dir)
    hidden = config.hidden_size
    embed = getattr(config, "word_embed_proj_dim", None) or hidden
    # A sliding window (Mistral, Qwen2) does not shorten the context: stages mask it (Shard.with_window).
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions")
    return ModelInfo(config.model_type, config.num_hidden_layers, config.vocab_size, embed, hidden, max_positions)


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


def optimizer_arrays(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """A torch optimizer's state_dict as (per-parameter tensors by "index.name", the rest as JSON):
    what safetensors can hold, with no pickle to load back."""
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{name}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "plain": plain})


def optimizer_state(tensors: dict[str, torch.Tensor], text: str) -> dict:
    """The state_dict `optimizer_arrays` took apart, ready for `optimizer.load_state_dict`."""
    rest = json.loads(text)
    state: dict[int, dict] = {}
    for key, value in (tensors | rest["plain"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_optimizer_state(state: dict, path: str | Path) -> None:
    """A torch optimizer's state_dict as one safetensors file (the rest in its header)."""
    from safetensors.torch import save_file

    tensors, text = optimizer_arrays(state)
    save_file(tensors, str(path), metadata={"optimizer": text})


def load_optimizer_state(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The state_dict `save_optimizer_state` wrote."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        text = f.metadata()["optimizer"]
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return optimizer_state(tensors, text)


def load_tokenizer(path, flag: str = "model"):
    """The tokenizer saved with a checkpoint, or a UserError naming `--flag` and why it is unusable."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--{flag} {path} has no usable tokenizer ({str(e).splitlines()[0]})")
