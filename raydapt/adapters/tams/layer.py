"""The TAMS supernet cell and its controller (Hou, Salazar, Polovets, TACL 2022, sec. 3.2).

Cell, beside a block's FFN (x its input, (B, T, d)):  h0 = P_in x;  h_i = sum_{j < i} op_ij(h_j);
out = P_out h_N, added to the FFN's output. P_out starts at zero, so the cell adds exactly 0.0 at init
and the extended model is bit-identical to the backbone. Every candidate op of every edge has its own
weights, shared by all tasks (the supernet). Convolutions are depthwise and causal (a token never
sees a later one), so the LM stays an LM.

Controller: a 2-layer MLP from the task embedding to logits (edges, ops). Training uses the
straight-through estimator: the forward pass weights each edge's ops by the one-hot argmax, the
backward pass by the softmax's gradient; at test time only the argmax op of each edge is run.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TAMSCell", "TAMSController", "straight_through"]


def straight_through(logits: torch.Tensor) -> torch.Tensor:
    """(E, K) logits -> (E, K) weights: one-hot argmax forward, softmax gradient backward."""
    soft = torch.softmax(logits, -1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


class _Op(nn.Module):
    """One candidate operation on (B, T, w)."""

    def __init__(self, name: str, width: int):
        super().__init__()
        self.name = name
        if name == "linear":
            self.proj = nn.Linear(width, width)
        elif name == "glu":
            self.proj = nn.Linear(width, 2 * width)
        elif name.startswith("conv"):
            self.kernel = int(name[4:])
            self.conv = nn.Conv1d(width, width, self.kernel, groups=width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.name == "zero":
            return torch.zeros_like(h)
        if self.name == "identity":
            return h
        if self.name == "linear":
            return self.proj(h)
        if self.name == "glu":
            return F.glu(self.proj(h), -1)
        padded = F.pad(h.transpose(1, 2), (self.kernel - 1, 0))  # (B, w, T + k - 1): causal
        return self.conv(padded).transpose(1, 2)


class TAMSCell(nn.Module):
    """forward(x (B, T, d), weights (E, K) or choice (E,) ints) -> (B, T, d)."""

    def __init__(self, d: int, width: int, nodes: int, ops: list[str]):
        super().__init__()
        self.nodes, self.ops = nodes, list(ops)
        self.p_in = nn.Linear(d, width, bias=False)
        nn.init.normal_(self.p_in.weight, 0.0, 1.0 / math.sqrt(d))
        self.edges = nn.ModuleList(nn.ModuleList(_Op(o, width) for o in ops) for _ in range(nodes * (nodes + 1) // 2))
        self.p_out = nn.Linear(width, d, bias=False)
        nn.init.zeros_(self.p_out.weight)  # the cell starts by adding exactly 0

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None, choice: list[int] | None = None):
        states, edge = [self.p_in(x)], 0
        for _ in range(self.nodes):
            total = 0
            for h in states:
                ops = self.edges[edge]
                if choice is not None:
                    total = total + ops[choice[edge]](h)
                else:
                    total = total + sum(weights[edge, k] * op(h) for k, op in enumerate(ops))
                edge += 1
            states.append(total)
        return self.p_out(states[-1])


class TAMSController(nn.Module):
    """Task embedding (d,) -> op logits (E, K), a 2-layer MLP; keeps the current task's selection."""

    def __init__(self, d: int, hidden: int, edges: int, ops: int):
        super().__init__()
        self.edges, self.n_ops = edges, ops
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, edges * ops))
        self.weights: torch.Tensor | None = None  # (E, K), straight-through; set by select()
        self.choice: list[int] | None = None      # argmax per edge
        self.hard = False                        # test time: run only the argmax ops

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.mlp(embedding).view(self.edges, self.n_ops)

    def select(self, embedding: torch.Tensor, hard: bool = False) -> list[int]:
        logits = self.logits(embedding)
        self.weights = straight_through(logits)
        self.choice = [int(i) for i in logits.argmax(-1)]
        self.hard = hard
        return self.choice
