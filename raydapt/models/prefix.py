"""Prefix sharing: a prompt prefix's keys and values computed once per candidate, not once per row.

In BBT's add and cat modes and BBTv2's deep mode the continuous prompt sits in the first positions
of every row (after the same `offset` tokens), and a causal LM's states there do not depend on the
text after them. For a population request (P candidates x N examples) a stage therefore runs the
prefix as a (C, Lp) batch, one row per candidate of the micro-batch, keeps each block's keys and
values, and runs the rows' remaining positions Lp..Lp+Ts-1 against them: (M, Ts) instead of
(M, Lp + Ts). This is vLLM's automatic prefix caching, inside one micro-batch.

Exact up to float rounding for every supported family: positions continue at Lp (learned positions
of GPT-2 and OPT, whose offset of 2 `Family.embed` adds; rotary positions of Llama, Mistral, Qwen2),
the suffix's mask is causal over its own positions and open on the whole prefix, a sliding window
(Mistral, Qwen2) is part of that mask, and rows are right-padded, so padding never precedes a real
position. The keys and values enter each attention through Hugging Face's cache protocol
(`cache.update(keys, values, layer_idx)`), the way generation reuses a prompt's cache.
"""
from __future__ import annotations

import torch

from raydapt.models.prompts import add_at_slots
from raydapt.models.shard import Shard, attention_mask

__all__ = ["run_blocks_shared"]


class _Record:
    """Cache for the prefix pass: keeps the block's keys and values (C, kv_heads, Lp, hd)."""

    def update(self, keys, values, layer_idx, *args, **kwargs):
        self.keys, self.values = keys, values
        return keys, values


class _Attach:
    """Cache for the suffix pass: row i attends to its candidate's prefix, then to its own positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # (M, kv_heads, Lp, hd)

    def update(self, keys, values, layer_idx, *args, **kwargs):
        return torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)


def _call(block, hidden: torch.Tensor, kwargs: dict, cache) -> torch.Tensor:
    out = block(hidden, cache=cache, use_cache=True, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_blocks_shared(shard: Shard, prefix: torch.Tensor, suffix: torch.Tensor, owner: torch.Tensor,
                      deep_prompt: torch.Tensor | None = None, offset: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`Shard.run_blocks` for rows that share a prefix.

    prefix (C, Lp, D): the candidates' prefix states; suffix (M, Ts, D): each row's states after the
    prefix (positions Lp..Lp+Ts-1); owner (M,): row i's candidate, an index into prefix.
    deep_prompt (C, n_blocks, L, D) is added at prefix positions [offset, offset + L) of each
    block's input (BBTv2); it must lie inside the prefix. Returns both outputs.
    """
    n_prefix, n_suffix = prefix.shape[1], suffix.shape[1]
    prefix_kwargs = shard.block_kwargs(prefix)
    suffix_kwargs = shard.block_kwargs(suffix, start=n_prefix)
    masks: dict[int | None, torch.Tensor] = {}
    for i, block in enumerate(shard.blocks):
        if deep_prompt is not None:
            prefix = add_at_slots(prefix, deep_prompt[:, i], offset)
        record = _Record()
        prefix = _call(block, prefix, shard.with_window(prefix_kwargs, i, n_prefix), record)
        window = shard.windows[i]
        if window not in masks:  # (1, 1, Ts, Lp + Ts): the prefix is visible, the suffix causal
            masks[window] = attention_mask(n_suffix, n_prefix + n_suffix, window, suffix.device)
        attach = _Attach(record.keys[owner], record.values[owner])
        suffix = _call(block, suffix, suffix_kwargs | {"attention_mask": masks[window]}, attach)
    return prefix, suffix
