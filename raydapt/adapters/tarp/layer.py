"""The TARP reparameterisation of one dense layer (Hou, Salazar, Polovets, TACL 2022, sec. 3.1):

    W = Phi1 (.) W0 + Phi2   =>   y = W0 x + b + ((Phi1 - 1) (.) W0) x + Phi2 x

The backbone's own layer computes W0 x + b, untouched; this module adds the last two terms, the
"difference". Phi1 - 1 and Phi2 are low-rank:

- bilinear:  U V^T                                   U (d_out, r), V (d_in, r)
- kronecker: sum_k H_k (x) U_k V_k^T, k = 1..n       H_k (n, n), U_k (d_out/n, r), V_k (d_in/n, r)
- dynamic:   U Sigma(x) V^T, Sigma(x) = reshape(S x / d_in + s, (r, r)) per token

(the 1/d_in keeps a step of Adam on S from moving Sigma by ~ lr * |x|_1, which at the backbone's
normalised inputs (|x_i| ~ 1) grows with the width and made the dynamic form diverge at lr 3e-3)

Every U (static kinds) and every Sigma layer (dynamic) starts at exactly 0, so Phi1 starts at exactly
1 and Phi2 at 0: the delta is exactly 0.0 and the extended model's outputs are bit-identical to the
backbone's. The dynamic multiplicative term never builds a per-token d_out x d_in matrix:
((U S V^T) (.) W0) x = sum_ij S_ij u_i (.) (W0 (v_j (.) x)), r products with W0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TARPDelta", "max_rank"]


def max_rank(d_in: int, d_out: int, kind: str, n: int) -> int:
    """The largest rank a layer (d_in -> d_out) accepts: min(d_in, d_out), over n for Kronecker."""
    return min(d_in, d_out) // n if kind == "kronecker" else min(d_in, d_out)


class TARPDelta(nn.Module):
    """The TARP difference of one layer: forward(x (..., d_in), w0 (d_out, d_in)) -> (..., d_out)."""

    def __init__(self, d_in: int, d_out: int, kind: str, rank: int, n: int = 4):
        super().__init__()
        self.d_in, self.d_out, self.kind, self.rank, self.n = d_in, d_out, kind, rank, n
        for part in ("mul", "add"):
            if kind == "kronecker":
                self.register_parameter(f"{part}_h", nn.Parameter(torch.randn(n, n, n) / math.sqrt(n)))
                self.register_parameter(f"{part}_u", nn.Parameter(torch.zeros(n, d_out // n, rank)))
                self.register_parameter(f"{part}_v", nn.Parameter(torch.randn(n, d_in // n, rank) / math.sqrt(d_in // n)))
            else:
                u = torch.randn(d_out, rank) / math.sqrt(rank) if kind == "dynamic" else torch.zeros(d_out, rank)
                self.register_parameter(f"{part}_u", nn.Parameter(u))
                self.register_parameter(f"{part}_v", nn.Parameter(torch.randn(d_in, rank) / math.sqrt(d_in)))
            if kind == "dynamic":
                sigma = nn.Linear(d_in, rank * rank)
                nn.init.zeros_(sigma.weight)
                nn.init.zeros_(sigma.bias)
                self.add_module(f"{part}_sigma", sigma)

    def phi(self, part: str) -> torch.Tensor:
        """The static low-rank matrix (d_out, d_in) of `part` ('mul': Phi1 - 1, 'add': Phi2)."""
        u, v = getattr(self, f"{part}_u"), getattr(self, f"{part}_v")
        if self.kind == "bilinear":
            return u @ v.T
        h = getattr(self, f"{part}_h")
        blocks = u @ v.transpose(1, 2)  # (n, d_out/n, d_in/n)
        return sum(torch.kron(h[k], blocks[k]) for k in range(self.n))

    def _sigma(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight / self.d_in, layer.bias)

    def forward(self, x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        if self.kind != "dynamic":
            return F.linear(x, self.phi("mul") * w0 + self.phi("add"))
        r = self.rank
        s_mul = self._sigma(self.mul_sigma, x).unflatten(-1, (r, r))  # (..., r, r)
        s_add = self._sigma(self.add_sigma, x).unflatten(-1, (r, r))
        z = F.linear(x.unsqueeze(-2) * self.mul_v.T, w0)  # (..., r, d_out): W0 (v_j (.) x)
        mul = ((s_mul @ z) * self.mul_u.T).sum(-2)       # sum_i u_i (.) sum_j S_ij z_j
        add = (s_add @ (x @ self.add_v).unsqueeze(-1)).squeeze(-1) @ self.add_u.T  # U S V^T x
        return mul + add
