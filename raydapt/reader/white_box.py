"""The white-box reference reader: the small LM fine-tuned (every weight, plus a soft prompt) on the
same packed rows the frozen reader reads, in this process.

`WhiteBoxReader` is the trained module and `WhiteBoxLM` answers the calls the gray-box loop makes of
a `FrozenLM` (loss on labels, logits at positions) with the module's own LM, gradients reaching its
weights; so input-dependent prompt tuning's loop, checkpoints and exact match train and score it
unchanged, and a checkpoint holds the LM's weights with the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydapt.graybox import IGNORE
from raydapt.oracle import GrayUsage

__all__ = ["WhiteBoxReader", "WhiteBoxLM"]


class WhiteBoxReader(nn.Module):
    def __init__(self, lm: nn.Module, prompt_length: int):
        super().__init__()
        self.lm = lm
        emb = lm.get_input_embeddings().weight
        self.prompt = nn.Parameter(torch.randn(prompt_length, emb.shape[1]) * float(emb.detach().std()))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.prompt.expand(input_ids.shape[0], -1, -1)


@dataclass
class _Info:
    embed_dim: int


@dataclass
class _Oracle:
    """What the job reads of a gray-box oracle: its usage counters and model info."""
    info: _Info
    usage: GrayUsage = field(default_factory=GrayUsage)


class WhiteBoxLM:
    """FrozenLM's call signature over the module's own (trainable) LM."""

    def __init__(self, module: WhiteBoxReader):
        self.module = module
        self.oracle = _Oracle(_Info(module.prompt.shape[1]))

    def __call__(self, input_ids, lengths, labels=None, prompt=None, offset: int = 0, positions=None, **_) -> dict:
        ids, lengths = torch.as_tensor(np.asarray(input_ids)), torch.as_tensor(np.asarray(lengths))
        x = self.module.lm.get_input_embeddings()(ids)                                  # (B, T, E)
        x = torch.cat([x[:, :offset], prompt, x[:, offset:]], 1)
        width = x.shape[1]
        mask = (torch.arange(width)[None, :] < (lengths + prompt.shape[1])[:, None]).long()
        logits = self.module.lm(inputs_embeds=x, attention_mask=mask).logits            # (B, T', V)
        self.oracle.usage.requests += 1
        self.oracle.usage.forward_tokens += int(mask.sum())
        out = {}
        if labels is not None:
            lab = torch.as_tensor(np.asarray(labels)).clone()
            lab[torch.arange(lab.shape[1])[None, :] >= lengths[:, None]] = IGNORE
            gap = torch.full((len(lab), prompt.shape[1]), IGNORE, dtype=lab.dtype)
            lab = torch.cat([lab[:, :offset], gap, lab[:, offset:]], 1)                 # (B, T')
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                  ignore_index=IGNORE, reduction="none")
            out["loss"] = nll.view(len(lab), -1).sum(1)
        if positions is not None:
            at = torch.as_tensor(np.asarray(positions))
            out["logits"] = logits[torch.arange(len(at))[:, None], at]
        return out
