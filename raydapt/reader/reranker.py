"""The re-ranker: a cross-encoder that reads (question, passage) jointly (Levine et al., 2022).

The small LM reads "{question}\\n{passage}" (the question's tokens, a newline, the passage's, each
cut to its limit); a linear head on its final state at the last real token gives a score, added to
a learned multiple of the retriever's (standardised) BM25 score. The head starts at zero and the
multiple at one, so an untrained re-ranker orders passages exactly as BM25 does, and training can
only move it away from that order where the data say so. Trained listwise: for each question, a
softmax over its gold passage and `negatives` hard negatives (the retriever's best-scored wrong
passages), cross-entropy on the gold one. The whole small LM is fine-tuned with the head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["Reranker", "PairTokens", "pair_batch", "training_groups", "standardise", "group_loss", "rerank"]


class Reranker(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.base = getattr(lm, lm.base_model_prefix)  # the decoder without its LM head
        self.head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.bm25_weight = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, bm25: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, (B,) lengths, (B,) standardised BM25 scores -> (B,) scores."""
        mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        states = self.base(input_ids=input_ids, attention_mask=mask).last_hidden_state   # (B, T, D)
        last = states[torch.arange(len(lengths)), lengths - 1]                             # (B, D)
        return self.head(last)[:, 0] + self.bm25_weight * bm25


@dataclass
class PairTokens:
    """Token ids of the questions and passages, each cut to its limit, and the joining newline."""
    questions: list[list[int]]
    passages: list[list[int]]
    join: list[int]
    pad: int


def pair_batch(tokens: PairTokens, question_rows: np.ndarray, passage_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), lengths (B,)) of the pairs (question_rows[i], passage_rows[i]), right-padded."""
    seqs = [tokens.questions[q] + tokens.join + tokens.passages[p] for q, p in zip(question_rows, passage_rows)]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), tokens.pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, lengths


def standardise(scores: np.ndarray) -> np.ndarray:
    """Each question's retriever scores, centred and scaled by its own top-N (so questions compare)."""
    mean, std = scores.mean(1, keepdims=True), scores.std(1, keepdims=True)
    return ((scores - mean) / np.where(std > 0, std, 1)).astype(np.float32)


def training_groups(candidates: np.ndarray, scores: np.ndarray, gold: np.ndarray, negatives: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(passage rows (Q, 1 + negatives), their standardised BM25 scores): gold first, then the best-scored
    wrong passages. A gold passage the retriever missed gets the lowest score of its top-N."""
    z = standardise(scores)
    rows = np.empty((len(gold), 1 + negatives), np.int64)
    bm25 = np.empty((len(gold), 1 + negatives), np.float32)
    for i, (c, g) in enumerate(zip(candidates, gold)):
        wrong = np.flatnonzero(c != g)[:negatives]
        hit = np.flatnonzero(c == g)
        rows[i] = np.r_[g, c[wrong]]
        bm25[i] = np.r_[z[i, hit[0]] if len(hit) else z[i].min(), z[i, wrong]]
    return rows, bm25


def group_loss(model: Reranker, tokens: PairTokens, questions: np.ndarray, rows: np.ndarray, bm25: np.ndarray
               ) -> torch.Tensor:
    """Mean over the questions of -log softmax(scores)[gold] over each question's group (gold at 0)."""
    q, k = rows.shape
    ids, lengths = pair_batch(tokens, np.repeat(questions, k), rows.reshape(-1))
    scores = model(ids, lengths, torch.from_numpy(bm25.reshape(-1))).view(q, k)
    return nn.functional.cross_entropy(scores, torch.zeros(q, dtype=torch.long))


@torch.no_grad()
def rerank(model: Reranker, tokens: PairTokens, candidates: np.ndarray, scores: np.ndarray, batch: int = 512
           ) -> tuple[np.ndarray, np.ndarray]:
    """(candidates reordered best first by the re-ranker, its scores) for every question's top-N."""
    model.eval()
    q, n = candidates.shape
    z = standardise(scores).reshape(-1)
    questions, rows = np.repeat(np.arange(q), n), candidates.reshape(-1)
    out = np.empty(q * n, np.float32)
    for s in range(0, q * n, batch):
        ids, lengths = pair_batch(tokens, questions[s: s + batch], rows[s: s + batch])
        out[s: s + batch] = model(ids, lengths, torch.from_numpy(z[s: s + batch])).numpy()
    out = out.reshape(q, n)
    order = np.argsort(-out, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(out, order, 1)
