"""Pure functions from final logits to what the black-box oracle answers."""
from __future__ import annotations

import torch

__all__ = ["token_stats"]


def token_stats(logits: torch.Tensor, input_ids: torch.Tensor, top_k: int = 0, full: bool = False) -> dict:
    """Per-position next-token statistics.

    logits (B,T,V) float32, input_ids (B,T). Position t in 1..T-1 is scored from logits[:, t-1]:
    logprob (B,T-1) = log p(x_t | x_<t); entropy (B,T-1) in nats; optional top-k log-probs and ids
    (B,T-1,k) and the full log-distribution (B,T-1,V).
    """
    logp = torch.log_softmax(logits[:, :-1], dim=-1)                     # (B,T-1,V)
    out = {
        "logprob": logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1),  # (B,T-1)
        "entropy": -(logp.exp() * logp).sum(-1),                         # (B,T-1)
    }
    if top_k:
        values, ids = logp.topk(top_k, dim=-1)
        out["topk_logprobs"], out["topk_ids"] = values, ids
    if full:
        out["full"] = logp
    return {k: v.cpu().numpy() for k, v in out.items()}
