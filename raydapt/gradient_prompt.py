"""Gradient prompt tuning: BBT's prompt learned with gradients through the frozen model.

BBT (Sun et al., ICML 2022) searches the prompt without gradients; this white-box version (the
"prompt tuning" row of its tables, Lester et al., 2021, in BBT's "add" mode) learns the same L
continuous vectors, added to the input embeddings of the L placeholder slots, by Adam on the
cross-entropy over the label-word logits. It is BBT's upper reference, and the measure of how much
room the default task leaves for prompt search.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raydapt.models.prompts import add_at_slots

__all__ = ["prompted_label_logits", "tune_prompt"]


def _label_logits(model, input_ids: torch.Tensor, lengths: torch.Tensor, prompt: torch.Tensor | None,
                  label_ids: list[int]) -> torch.Tensor:
    """(N, K) label-word logits; differentiable in `prompt` (L, D)."""
    embeds = model.get_input_embeddings()(input_ids)  # (N, T, D)
    if prompt is not None:
        embeds = add_at_slots(embeds, prompt)
    # No attention mask: rows are right-padded and attention is causal, so the answer position
    # (lengths - 1) never sees a pad.
    hidden = model.base_model(inputs_embeds=embeds).last_hidden_state  # (N, T, D)
    last = hidden[torch.arange(len(lengths)), lengths - 1]  # (N, D)
    return model.get_output_embeddings()(last)[:, label_ids]  # (N, K); the head only at the answer


def prompted_label_logits(model, input_ids, lengths, prompt, label_ids: list[int],
                          batch_size: int = 64) -> torch.Tensor:
    """Label-word logits (N, K) at each row's answer position (lengths - 1).

    input_ids: (N, T) int, rows start with L = prompt.shape[0] placeholder slots; lengths: (N,);
    prompt: (L, D) added to the placeholder embeddings, or None for no prompt.
    """
    input_ids, lengths = torch.as_tensor(input_ids), torch.as_tensor(lengths)
    with torch.no_grad():
        return torch.cat([_label_logits(model, input_ids[i: i + batch_size], lengths[i: i + batch_size],
                                        prompt, label_ids) for i in range(0, len(lengths), batch_size)])


def tune_prompt(model, input_ids, lengths, labels, label_ids: list[int], prompt_length: int,
                steps: int, lr: float, seed: int, batch_size: int | None = None) -> torch.Tensor:
    """Learn a prompt (prompt_length, D) by Adam on the label-word cross-entropy; the model stays frozen.

    The prompt starts at zero (the placeholder embeddings unchanged). Mini-batches of `batch_size`
    rows (default: all rows every step) are drawn in an order fixed by `seed`.
    """
    input_ids, lengths = torch.as_tensor(input_ids), torch.as_tensor(lengths)
    labels = torch.as_tensor(labels)
    if prompt_length > input_ids.shape[1]:
        raise ValueError(f"prompt_length {prompt_length} exceeds the rows' length {input_ids.shape[1]}")
    width = model.get_input_embeddings().weight.shape[1]
    prompt = torch.zeros(prompt_length, width, requires_grad=True)
    opt = torch.optim.Adam([prompt], lr=lr)
    rng = np.random.default_rng(seed)
    batch_size = batch_size or len(labels)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # no weight gradients: only the prompt learns, and faster
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            rows = torch.from_numpy(rng.permutation(len(labels))[:batch_size])
            logits = _label_logits(model, input_ids[rows], lengths[rows], prompt, label_ids)
            loss = F.cross_entropy(logits, labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return prompt.detach()
