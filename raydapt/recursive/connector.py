"""The modules a recursive LM learns around its frozen LM (Levine et al., 2022, section 5).

Both passes run the same frozen LM, each behind its own static soft prompt. The neural recursive
LM adds a connector: pass 1's final hidden states (after the final norm, unit scale) become input
embeddings of pass 2 (token-embedding scale). It is an MLP with a residual, `scale * h + MLP(h)`:
the residual lets the states through at the embeddings' scale from the first step (a final state
points at the token it predicts, whose tied embedding is what pass 2 reads best), and the MLP,
which starts at zero, learns the rest.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from raydapt.idpt.generator import StaticPrompt

__all__ = ["Connector", "RecursiveLM"]


class Connector(nn.Module):
    def __init__(self, width: int, hidden: int, embedding_std: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(embedding_std)))  # (1,): checkpoints keep no 0-d arrays
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        nn.init.normal_(self.up.weight, std=1 / math.sqrt(width))  # unit-scale states in, unit-scale features out
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)  # starts as the residual alone
        nn.init.zeros_(self.down.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, m, D) -> input embeddings (B, m, E), D == E (the same LM)."""
        return self.scale * states + self.down(torch.nn.functional.gelu(self.up(states)))


class RecursiveLM(nn.Module):
    """What one method learns: pass 1's prompt, and for recursion pass 2's prompt (+ the connector)."""

    def __init__(self, method: str, prompt_length: int, width: int, embedding_std: float, connector_width: int):
        super().__init__()
        # Built first from the seed: pass 1 starts from the same bits in every method.
        self.first = StaticPrompt(prompt_length, width, embedding_std)
        self.second = StaticPrompt(prompt_length, width, embedding_std) if method != "one_pass" else None
        self.connector = (Connector(width, connector_width, embedding_std) if method.startswith("neural") else None)

    def trainable(self, phase: str) -> list[nn.Parameter]:
        """The parameters a phase trains: pass 1's prompt; the connector alone in pre-training; pass 2's
        prompt (and the connector) on the task."""
        parts = {"first": [self.first], "pretrain": [self.connector], "second": [self.second, self.connector]}[phase]
        return [p for part in parts if part is not None for p in part.parameters()]

    def second_prompt(self, rows: int, states: torch.Tensor | None = None) -> torch.Tensor:
        """Pass 2's prompt (B, n_p [+ m], E): its soft prompt, then the connector's vectors if neural."""
        prompt = self.second.prompt.expand(rows, -1, -1)
        return prompt if states is None else torch.cat([prompt, self.connector(states)], 1)
