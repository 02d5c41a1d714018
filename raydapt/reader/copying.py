"""Can a frozen LM read at all? The induction test of Olsson et al. (2022).

An open-book reader must copy the answer's tokens out of its context. A causal LM that can does so
on the second repeat of a random token sequence, where nothing but the first repeat predicts the
next token (LMs with induction heads get most of them right); one that cannot scores about
1 / vocabulary. `python -m raydapt.data.make_openbook --evaluate` reports it beside the task's
exact match: a reader scoring near 0 here cannot be prompt-tuned into an extractive reader.
"""
from __future__ import annotations

import torch

__all__ = ["copy_accuracy"]


@torch.no_grad()
def copy_accuracy(model, vocab_size: int, rows: int = 16, length: int = 50, first_id: int = 100,
                  seed: int = 0) -> float:
    """Share of the second repeat's tokens (after its first) that are the model's greedy argmax.

    Token ids are drawn uniformly from [first_id, vocab_size), away from special and byte tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(first_id, vocab_size, (rows, length), generator=generator)
    ids = torch.cat([tokens, tokens], dim=1)
    logits = model(input_ids=ids).logits
    predicted = logits[:, length:-1].argmax(-1)  # the prediction at position t is for token t + 1
    return float((predicted == ids[:, length + 1:]).float().mean())
