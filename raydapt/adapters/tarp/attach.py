"""Attaching TARP to every attention and FFN linear of a Hugging Face decoder, in place.

Each target linear gets a child `tarp` (a TARPDelta) and a forward hook that adds its delta to the
layer's own output; backbone parameter names do not change (as in raydapt.adapters.attach). GPT-2's
linears are transformers' Conv1D, whose weight is stored (d_in, d_out): the hook hands the delta W0
as (d_out, d_in) either way. The live W0 is read at every call, so a meta-learning outer loop that
updates the backbone is seen by the multiplicative term.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from raydapt.adapters.attach import FFN_SITES, base_record
from raydapt.adapters.tarp.config import TARPConfig
from raydapt.adapters.tarp.layer import TARPDelta, max_rank
from raydapt.errors import UserError

__all__ = ["attach_tarp", "tarp_layers", "target_linears", "TARGETS", "weight_out_in"]

TARP_NAME = "tarp"
_LLAMA = r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
TARGETS = {  # model_type -> the full names of every attention and FFN linear
    "gpt2": r"transformer\.h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))",
    "opt": r"model\.decoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)",
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
}


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D: weight (d_in, d_out)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (d_out, d_in), whatever its class stores."""
    return module.weight.T if _is_conv1d(module) else module.weight


def target_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    model_type = model.config.model_type
    if model_type not in TARGETS:
        raise UserError(f"tarp: unsupported architecture {model_type!r}; supported: {', '.join(TARGETS)}")
    found = [(n, m) for n, m in model.named_modules() if re.fullmatch(TARGETS[model_type], n)]
    assert found, f"no TARP target in a {model_type} model"
    return found


def attach_tarp(model: nn.Module, cfg: TARPConfig, freeze: bool = True) -> tuple[nn.Module, TARPConfig]:
    """Reparameterise every attention and FFN linear of `model` by `cfg`; (model, cfg with base).

    With `freeze` the backbone's requires_grad is turned off. UserError before anything is changed
    when the rank does not fit a layer. Initialisation draws from torch's global generator.
    """
    targets = target_linears(model)
    for name, module in targets:
        d_out, d_in = weight_out_in(module).shape
        top = max_rank(d_in, d_out, cfg.kind, cfg.n)
        if cfg.rank > top:
            raise UserError(f"--rank: {cfg.rank} is larger than layer {name} allows ({d_in} -> {d_out}"
                            f"{f', over n = {cfg.n} Kronecker factors' if cfg.kind == 'kronecker' else ''}); "
                            f"accepted: 1 to {top}")
        if cfg.kind == "kronecker" and (d_in % cfg.n or d_out % cfg.n):
            raise UserError(f"--tarp kronecker: layer {name} ({d_in} -> {d_out}) is not divisible by n = {cfg.n}")
    cfg = dataclasses.replace(cfg, base_model=base_record(model))
    if freeze:
        model.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    for _, module in targets:
        d_out, d_in = weight_out_in(module).shape
        module.add_module(TARP_NAME, TARPDelta(d_in, d_out, cfg.kind, cfg.rank, cfg.n).to(dtype))
        module.register_forward_hook(_add_delta)
    return model, cfg


def _add_delta(module, args, output):
    return output + module.tarp(args[0], weight_out_in(module))


def tarp_layers(model: nn.Module) -> list[TARPDelta]:
    return [m for m in model.modules() if isinstance(m, TARPDelta)]


def tarp_share(model: nn.Module) -> float:
    """TARP parameters / backbone parameters (the trainable-parameter share of TARP alone)."""
    tarp = sum(p.numel() for m in tarp_layers(model) for p in m.parameters())
    return tarp / backbone_only(model)


def backbone_only(model: nn.Module) -> int:
    """Distinct backbone parameters, leaving out every extension (TARP, TAMS) module's."""
    params = {id(p): p for n, p in model.named_parameters() if not _is_extension(n)}
    return sum(p.numel() for p in params.values())


def _is_extension(name: str) -> bool:
    return f".{TARP_NAME}." in name or name.startswith("tams") or ".tams_" in name


__all__ += ["tarp_share", "backbone_only", "TARP_NAME", "FFN_SITES"]
