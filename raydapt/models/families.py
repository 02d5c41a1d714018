"""What raydapt needs to know about each decoder family, in one small table per family.

A family says where the token embeddings, decoder blocks, final norm and LM head live in the
Hugging Face module tree, which extra modules the first and last stages own, and how the input
to the first block and the per-block keyword arguments (positions) are computed. A new family is
one more `Family(...)` entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Family", "FAMILIES", "family_for", "SUPPORTED_MODEL_TYPES"]

Modules = dict[str, nn.Module]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    embed_tokens: str                                   # token embedding (first stage)
    layers: str                                         # nn.ModuleList of decoder blocks
    final_norm: str | None                              # last stage, before the head
    head: str = "lm_head"
    first_extras: tuple[str, ...] = ()                  # other modules the first stage owns
    last_extras: tuple[str, ...] = ()                   # other modules the last stage owns
    rotary: str | None = None                           # rebuilt on every stage (no weights)
    # (modules, inputs_embeds (B,T,E), position_ids (B,T)) -> hidden (B,T,D)
    embed: Callable[[Modules, torch.Tensor, torch.Tensor], torch.Tensor] = field(default=None)
    # (modules, hidden (B,T,D)) -> hidden before the head (B,T,E)
    finish: Callable[[Modules, torch.Tensor], torch.Tensor] = field(default=None)


def _gpt2_embed(m: Modules, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return x + m["transformer.wpe"](pos)


def _opt_embed(m: Modules, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    # OPT's learned positions are offset by 2 (a fairseq legacy); right-padded rows count from 0.
    positions = m["model.decoder.embed_positions"]
    if m.get("model.decoder.project_in") is not None:
        x = m["model.decoder.project_in"](x)
    return x + F.embedding(pos + positions.offset, positions.weight)


def _opt_finish(m: Modules, h: torch.Tensor) -> torch.Tensor:
    if m.get("model.decoder.final_layer_norm") is not None:
        h = m["model.decoder.final_layer_norm"](h)
    if m.get("model.decoder.project_out") is not None:
        h = m["model.decoder.project_out"](h)
    return h


def _no_positions(m: Modules, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return x  # rotary families apply positions inside attention


def _norm(path: str) -> Callable[[Modules, torch.Tensor], torch.Tensor]:
    return lambda m, h: m[path](h)


GPT2 = Family("gpt2", ("gpt2",), embed_tokens="transformer.wte", layers="transformer.h",
              final_norm="transformer.ln_f", first_extras=("transformer.wpe",),
              embed=_gpt2_embed, finish=_norm("transformer.ln_f"))
OPT = Family("opt", ("opt",), embed_tokens="model.decoder.embed_tokens", layers="model.decoder.layers",
             final_norm="model.decoder.final_layer_norm",
             first_extras=("model.decoder.embed_positions", "model.decoder.project_in"),
             last_extras=("model.decoder.project_out",), embed=_opt_embed, finish=_opt_finish)
LLAMA = Family("llama", ("llama", "mistral", "qwen2"), embed_tokens="model.embed_tokens",
               layers="model.layers", final_norm="model.norm", rotary="model.rotary_emb",
               embed=_no_positions, finish=_norm("model.norm"))

FAMILIES: tuple[Family, ...] = (GPT2, OPT, LLAMA)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)
