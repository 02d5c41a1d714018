"""Where a continuous prompt enters a frozen LM: added to the L slots of a sequence, one function for
the stages, the GDFO student and gradient prompt tuning, so their forwards cannot drift apart."""
from __future__ import annotations

import torch

__all__ = ["add_at_slots"]


def add_at_slots(x: torch.Tensor, prompt: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """x (B, T, D) with `prompt` (B or 1, L, D) or (L, D) added at positions [offset, offset + L).

    Out of place: autograd reaches `prompt`, and `x` (possibly a read-only input) is left as it is.
    """
    length = prompt.shape[-2]
    return torch.cat([x[:, :offset], x[:, offset:offset + length] + prompt.to(x.dtype), x[:, offset + length:]], 1)
