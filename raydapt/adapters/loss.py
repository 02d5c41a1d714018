"""The training objective of neutral residues (Signe Talla, Grave, Jegou, ICML 2025, sec. 3):

    loss = LM loss on every token + alpha * mean over blocks of |g(x) A(x)|_1 / d,

the l1 term averaged over original-domain tokens only (a per-token mask, so one batch may mix
domains). The sigmoid-gate ablation replaces it by the BCE of the gate as a new-domain classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raydapt.adapters.config import AdapterConfig
from raydapt.adapters.attach import adapters_of

__all__ = ["l1_term", "bce_term", "extension_loss", "gate_means"]


def l1_term(outputs: list[torch.Tensor], original: torch.Tensor) -> torch.Tensor:
    """mean over blocks of (sum over original tokens of |o_t|_1 / d) / (original tokens).

    outputs: per block (B, T, d) (OPT's FFN sees (B*T, d)); original: (B, T) bool. 0 when the batch
    has no original token.
    """
    d = outputs[0].shape[-1]
    mask = original.reshape(-1, 1).to(outputs[0].dtype)  # (B*T, 1)
    count = mask.sum().clamp_min(1.0)
    per_block = [(o.reshape(-1, d).abs() * mask).sum() / (d * count) for o in outputs]
    return torch.stack(per_block).mean()


def bce_term(gates: list[torch.Tensor], original: torch.Tensor) -> torch.Tensor:
    """mean over blocks of the BCE of the gate (B, T, 1) in (0, 1) against 'new domain' (1 - original)."""
    target = (~original).reshape(-1).to(gates[0].dtype)  # (B*T,)
    return torch.stack([F.binary_cross_entropy(g.reshape(-1).clamp(1e-6, 1 - 1e-6), target) for g in gates]).mean()


def extension_loss(model, input_ids: torch.Tensor, original: torch.Tensor, cfg: AdapterConfig) -> dict:
    """{"loss", "lm", "aux"} for a batch (B, T) of token ids with its domain mask (B, T) bool."""
    lm = model(input_ids=input_ids, labels=input_ids).loss
    aux = lm.new_zeros(())
    if cfg.aux_loss != "none":
        adapters = adapters_of(model)
        if cfg.aux_loss == "l1":
            aux = l1_term([a.last_output for a in adapters], original)
        else:
            aux = bce_term([a.last_gate for a in adapters], original)
    return {"loss": lm + cfg.alpha * aux, "lm": lm, "aux": aux}


@torch.no_grad()
def gate_means(model, original: torch.Tensor) -> dict[str, float] | None:
    """Mean gate value over original-domain and new-domain tokens of the last forward (None: no gate)."""
    gates = [a.last_gate for a in adapters_of(model) if a.last_gate is not None]
    if not gates:
        return None
    g = torch.stack([x.reshape(-1) for x in gates]).mean(0)  # (B*T,), mean over blocks
    original = original.reshape(-1)
    pick = lambda m: float(g[m].mean()) if m.any() else float("nan")  # noqa: E731
    return {"original": pick(original), "new": pick(~original)}
