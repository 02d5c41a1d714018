"""What passes between the two passes of a recursive LM, and the text its connector pre-trains on.

- textual: pass 1 samples k answers per input (seeded Gumbel-max on its logits, so the same logits
  give the same answers on any pipeline); pass 2 reads them as comment lines above the input;
- neural: pass 1's last m final hidden states, mapped by the connector (`connector.py`);
- pre-training: windows of general text (the LM's own pre-training part of the stdlib corpus;
  the tasks come from held-out files), pass 1 reading the first part and pass 2 predicting the rest.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from raydapt.data.multitask import IGNORE, EncodedMulti

__all__ = ["source_tokens", "sample_answers", "with_answers", "last_states", "text_windows"]

CHUNK = 512  # rows per sampling request: (rows, vocabulary) logits come back


def source_tokens(enc: EncodedMulti, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What pass 1 reads of each row: its tokens before the target (never the answer). (B, W), (B,)."""
    width = int(enc.target_start[rows].max())
    return enc.input_ids[rows, :width], enc.target_start[rows]


@torch.no_grad()
def sample_answers(frozen, ids: np.ndarray, lengths: np.ndarray, prompt: torch.Tensor, k: int, max_new: int,
                   temperature: float, end_id: int, key: list[int]) -> list[list[int]]:
    """k answers per row, sampled token by token until the end token or `max_new` tokens.

    ids (N, W), lengths (N,), prompt (n_p, E) in front of every row. Returns N * k token lists,
    row i's j-th answer at i * k + j. Token t of every answer is drawn with the generator seeded by
    key + [t], as argmax(logits / temperature + Gumbel noise): a categorical sample that depends only
    on the logits' bits, which do not depend on stages, replicas or micro-batch size.
    """
    n = len(lengths) * k
    buffer = np.zeros((n, ids.shape[1] + max_new), np.int64)
    buffer[:, : ids.shape[1]] = np.repeat(ids, k, 0)
    length = np.repeat(lengths, k).astype(np.int64)
    answers: list[list[int]] = [[] for _ in range(n)]
    active = np.ones(n, bool)
    for t in range(max_new):
        rows = np.flatnonzero(active)
        if not rows.size:
            break
        logits = np.concatenate([_last_logits(frozen, buffer, length, prompt, part)
                                 for part in np.array_split(rows, -(-len(rows) // CHUNK))])   # (n_active, V)
        noise = np.random.default_rng([*key, t]).gumbel(size=logits.shape).astype(np.float32)
        tokens = (logits / np.float32(temperature) + noise).argmax(-1)
        buffer[rows, length[rows]] = tokens
        length[rows] += 1
        for row, token in zip(rows, tokens):
            answers[row].append(int(token))
        active[rows[tokens == end_id]] = False
    return answers


def _last_logits(frozen, buffer, length, prompt, rows) -> np.ndarray:
    width = int(length[rows].max())
    positions = (length[rows] - 1 + prompt.shape[0])[:, None]
    out = frozen(buffer[rows, :width], length[rows], positions=positions,
                 prompt=prompt.expand(len(rows), -1, -1))["logits"]
    return out[:, 0].numpy()


def with_answers(enc: EncodedMulti, answers: list[list[int]], k: int, marker: list[int], end_id: int,
                 pad_id: int) -> EncodedMulti:
    """Pass 2's rows: each of the row's k answers as a line `marker answer END`, then the row itself.

    An answer cut off at `max_new` tokens gets its END here, so every line ends like the task's own
    answers do. Labels stay on the row's target and END only.
    """
    rows = []
    for i in range(len(enc.lengths)):
        prefix = []
        for answer in answers[i * k:(i + 1) * k]:
            prefix += marker + answer + ([] if answer and answer[-1] == end_id else [end_id])
        rows.append(prefix)
    lengths = enc.lengths + np.array([len(p) for p in rows], np.int64)
    input_ids = np.full((len(rows), int(lengths.max())), pad_id, np.int64)
    labels = np.full(input_ids.shape, IGNORE, np.int64)
    for i, prefix in enumerate(rows):
        own = slice(len(prefix), int(lengths[i]))
        input_ids[i, : len(prefix)] = prefix
        input_ids[i, own] = enc.input_ids[i, : enc.lengths[i]]
        labels[i, own] = enc.labels[i, : enc.lengths[i]]
    shift = lengths - enc.lengths
    return EncodedMulti(task=enc.task.copy(), input_ids=input_ids, lengths=lengths, labels=labels,
                        target_start=enc.target_start + shift)


def last_states(hidden: torch.Tensor, ends: np.ndarray, m: int) -> torch.Tensor:
    """The m final states before each row's end: hidden (B, T, D), ends (B,) -> (B, m, D)."""
    at = torch.from_numpy(ends)[:, None] - m + torch.arange(m)[None, :]   # (B, m)
    return hidden[torch.arange(hidden.shape[0])[:, None], at]


def text_windows(tokenizer, texts, width: int, limit: int, group: int = 8) -> np.ndarray:
    """Up to `limit` non-overlapping windows of `width` tokens, text by text in order: (n, width).
    `texts` may be lazy: they are read and tokenised `group` at a time, only until there are enough."""
    windows, texts = [], iter(texts)
    while len(windows) < limit:
        batch = list(itertools.islice(texts, group))
        if not batch:
            break
        for encoding in tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
            ids = np.asarray(encoding.ids, np.int64)
            windows += [ids[s:s + width] for s in range(0, len(ids) - width + 1, width)]
    return np.stack(windows[:limit]) if windows else np.zeros((0, width), np.int64)
