"""Attaching an extension to a Hugging Face decoder, in place, with the backbone frozen.

Gated and vanilla adapters become a child `residual_adapter` of every decoder block, called by
forward hooks on the block's FFN: a pre-hook keeps the FFN's input x, a hook adds g(x) * A(x) to the
FFN's output. Backbone parameter names do not change, so the backbone's state dict (and its bytes)
can be compared before and after training, and adapter weights load onto any copy of the base.
OPT has no FFN module: its input is fc1's and its output fc2's (before the block's dropout).
LoRA goes through `peft` (its own wrapper, B = 0 at init); full fine-tuning unfreezes everything.
"""
from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from raydapt.adapters.config import GATED, AdapterConfig
from raydapt.adapters.layers import GatedResidual, adapter_width
from raydapt.errors import UserError

__all__ = ["attach", "attach_to_blocks", "adapters_of", "trainable_state", "load_trainable", "base_record", "ffn_sites",
           "backbone_parameters", "ADAPTER_NAME", "FFN_SITES"]

ADAPTER_NAME = "residual_adapter"
# model_type -> (decoder blocks, the FFN's input module, its output module), paths under the model
FFN_SITES = {
    "gpt2": ("transformer.h", "mlp", "mlp"),
    "opt": ("model.decoder.layers", "fc1", "fc2"),
    "llama": ("model.layers", "mlp", "mlp"),
    "mistral": ("model.layers", "mlp", "mlp"),
    "qwen2": ("model.layers", "mlp", "mlp"),
}
_LORA_TARGETS = {
    "gpt2": r".*\.mlp\.(c_fc|c_proj)",   # attn.c_proj has the same leaf name: match the path
    "opt": r".*\.(fc1|fc2)",
    "llama": r".*\.mlp\.(gate_proj|up_proj|down_proj)",
}


def ffn_sites(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """(block, FFN input module, FFN output module) for every decoder block."""
    model_type = model.config.model_type
    if model_type not in FFN_SITES:
        raise UserError(f"adapters: unsupported architecture {model_type!r}; supported: {', '.join(FFN_SITES)}")
    blocks, first, last = FFN_SITES[model_type]
    return [(b, b.get_submodule(first), b.get_submodule(last)) for b in model.get_submodule(blocks)]


def backbone_parameters(model: nn.Module) -> int:
    """Distinct backbone parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def base_record(model: nn.Module) -> str:
    """What identifies a backbone for its adapters: type and sizes (checked on load)."""
    c = model.config
    return json.dumps({"model_type": c.model_type, "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
                       "vocab_size": c.vocab_size, "parameters": backbone_parameters(model)}, sort_keys=True)


def attach(model: nn.Module, cfg: AdapterConfig) -> tuple[nn.Module, AdapterConfig]:
    """Extend `model` by `cfg.method`; returns (the model to train, cfg with sizes and base filled).

    Only the extension's parameters keep requires_grad (every one for "full"). The random init
    draws from torch's global generator: seed it first for reproducible adapters.
    """
    cfg = dataclasses.replace(cfg, base_model=base_record(model))
    n, c = backbone_parameters(model), model.config
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, cfg
    model.requires_grad_(False)
    if cfg.method == "lora":
        return _attach_lora(model, cfg, n)
    d, sites = c.hidden_size, ffn_sites(model)
    hidden = adapter_width(n, len(sites), d, cfg.extra_params)
    cfg = dataclasses.replace(cfg, hidden=hidden)
    dtype = next(model.parameters()).dtype
    for block, first, last in sites:
        adapter = GatedResidual(d, hidden, len(sites), cfg.gate, cfg.init, cfg.activation).to(dtype)
        block.add_module(ADAPTER_NAME, adapter)
        first.register_forward_pre_hook(_keep_input(adapter))
        last.register_forward_hook(_add_residual(adapter))
    return model, cfg


def attach_to_blocks(blocks: dict[int, nn.Module], model_type: str, d: int, cfg: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
    """Put trained gated/vanilla adapters on some decoder blocks only (a pipeline stage's), by global
    block index; `tensors` are the full model's (`adapters.safetensors`), only these blocks' are read.

    For serving an extended model sharded (`raydapt score --adapters`): a stage calls this on the
    blocks it owns. LoRA and full fine-tuning are served as a merged ordinary checkpoint instead.
    """
    if cfg.method not in GATED + ("adapter",):
        raise UserError(f"adapters: {cfg.method} is served as a merged checkpoint, not attached to blocks")
    if model_type not in FFN_SITES:
        raise UserError(f"adapters: unsupported architecture {model_type!r}; supported: {', '.join(FFN_SITES)}")
    prefix, first, last = FFN_SITES[model_type]
    for index, block in blocks.items():
        adapter = GatedResidual(d, cfg.hidden, cfg_blocks(cfg), cfg.gate, cfg.init, cfg.activation)
        key = f"{prefix}.{index}.{ADAPTER_NAME}."
        mine = {k[len(key):]: v for k, v in tensors.items() if k.startswith(key)}
        expected = dict(adapter.named_parameters())
        if set(mine) != set(expected) or any(mine[k].shape != expected[k].shape for k in expected):
            raise UserError(f"adapters: block {index}'s tensors do not fit this backbone ({sorted(mine)[:2]}...)")
        adapter.load_state_dict(mine)
        adapter.requires_grad_(False)
        block.add_module(ADAPTER_NAME, adapter)
        block.get_submodule(first).register_forward_pre_hook(_keep_input(adapter))
        block.get_submodule(last).register_forward_hook(_add_residual(adapter))


def cfg_blocks(cfg: AdapterConfig) -> int:
    """The backbone's block count, from the base record attach wrote (init scale only)."""
    return json.loads(cfg.base_model)["layers"] if cfg.base_model else 1


def _keep_input(adapter: GatedResidual):
    def hook(module, args):
        adapter._ffn_input = args[0]
    return hook


def _add_residual(adapter: GatedResidual):
    def hook(module, args, output):
        x = adapter.__dict__.pop("_ffn_input")
        return output + adapter(x)
    return hook


def _attach_lora(model: nn.Module, cfg: AdapterConfig, n: int):
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    pattern = _LORA_TARGETS.get(model_type, _LORA_TARGETS["llama"])
    import re
    targets = [m for name, m in model.named_modules() if re.fullmatch(pattern, name)]
    io = sum(_fan(m) for m in targets)
    rank = max(1, int(round(cfg.extra_params * n / io)))
    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=pattern, bias="none",
                      fan_in_fan_out=model_type == "gpt2", init_lora_weights=True)
    return get_peft_model(model, lora), dataclasses.replace(cfg, rank=rank)


def _fan(module: nn.Module) -> int:
    """in + out features of a Linear or GPT-2 Conv1D (a rank-r LoRA adds r * (in + out))."""
    w = module.weight
    return int(w.shape[0] + w.shape[1])


def adapters_of(model: nn.Module) -> list[GatedResidual]:
    """The GatedResidual modules of an extended model, block order."""
    return [m for m in model.modules() if isinstance(m, GatedResidual)]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changed: every parameter with requires_grad, detached, by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into an extended model (names and shapes must match)."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise UserError(f"adapters: {len(missing)} saved tensors have no place in this model (e.g. {missing[0]}); "
                        "they were trained on another backbone or method")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise UserError(f"adapters: {name} is {tuple(value.shape)} in the file but "
                                f"{tuple(params[name].shape)} in the model: another backbone")
            params[name].copy_(value)
