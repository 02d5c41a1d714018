"""The gated residual adapter of neutral residues (Signe Talla, Grave, Jegou, ICML 2025, eq. 1-2).

    out = h + FFN(x) + g(x) * A(x),    A(x) = W_o(sigma(W_g x) * W_i x)

x is the FFN's input (after the block's norm), g a per-token scalar "block gate" (ReLU in the paper,
sigmoid in the domain-classifier ablation, absent in the vanilla adapter). W_o starts at zero, so
g(x) * A(x) is exactly 0.0 at init and the extended model's outputs are bit-identical to the
backbone's; W_i, W_g and the gate start with variance 1/(d L) (L blocks), or He's 2/d.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedResidual", "adapter_width", "gated_parameters"]

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def gated_parameters(d: int, hidden: int, gate: str) -> int:
    """Parameters of one block's adapter: W_i, W_g (hidden x d), W_o (d x hidden), the gate."""
    return 3 * d * hidden + {"none": 0, "relu": d, "sigmoid": d + 1}[gate]


def adapter_width(backbone_params: int, blocks: int, d: int, fraction: float) -> int:
    """The hidden width whose L adapters add `fraction` of the backbone's parameters (>= 1).

    The gate's d weights count too (3 d h + d per block), so a vanilla adapter of the same width
    is "the same size" to within d parameters per block.
    """
    per_block = fraction * backbone_params / blocks
    return max(1, int(round((per_block - d) / (3 * d))))


class GatedResidual(nn.Module):
    """g(x) * A(x) for one block; `x` (B, T, d) -> (B, T, d).

    The last call's output and gate are kept (`last_output`, `last_gate` (B, T, 1) or None) for the
    auxiliary losses, which need them per token and per block.
    """

    def __init__(self, d: int, hidden: int, blocks: int, gate: str = "relu", init: str = "dL",
                 activation: str = "silu"):
        super().__init__()
        self.d, self.hidden, self.gate_kind, self.activation = d, hidden, gate, activation
        self.w_i = nn.Linear(d, hidden, bias=False)
        self.w_g = nn.Linear(d, hidden, bias=False)
        self.w_o = nn.Linear(hidden, d, bias=False)
        self.gate = None if gate == "none" else nn.Linear(d, 1, bias=gate == "sigmoid")
        std = math.sqrt(2.0 / d) if init == "he" else math.sqrt(1.0 / (d * blocks))
        with torch.no_grad():
            for linear in (self.w_i, self.w_g, self.gate):
                if linear is not None:
                    linear.weight.normal_(0.0, std)
            if self.gate is not None and self.gate.bias is not None:
                self.gate.bias.zero_()
            self.w_o.weight.zero_()  # the extended model starts as the backbone, bit for bit
        self.last_output: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.w_o(_ACTIVATIONS[self.activation](self.w_g(x)) * self.w_i(x))  # (B, T, d)
        if self.gate is None:
            g = None
            out = a
        else:
            logit = self.gate(x)  # (B, T, 1)
            g = F.relu(logit) if self.gate_kind == "relu" else torch.sigmoid(logit)
            out = g * a
        self.last_output, self.last_gate = out, g
        return out
