"""Losses and metrics of a population of prompts over verbalizer logits (pure numpy).

Shapes: logits (P, N, K) = prompts x examples x label words (the logits of each class's label
word at the answer position, BBT Sec. 3.1), labels (N,) int in [0, K). Every function also takes
(N, K) logits and then returns a float. Computation is float64.
"""
from __future__ import annotations

import numpy as np

__all__ = ["cross_entropy", "hinge", "accuracy", "confusion_matrix", "macro_f1", "LOSSES", "METRICS"]


def _check(logits, labels) -> tuple[np.ndarray, np.ndarray, bool]:
    """-> logits (P, N, K) float64, labels (N,) int64, whether the input was a single prompt."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3 or y.shape != (x.shape[1],):
        raise ValueError(f"logits must be (P, N, K) or (N, K) and labels (N,); got {np.shape(logits)} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() >= x.shape[2])):
        raise ValueError(f"labels must be integers in [0, {x.shape[2]}), got {y}")
    return x, y.astype(np.int64), single


def _out(per_prompt: np.ndarray, single: bool):
    return float(per_prompt[0]) if single else per_prompt


def cross_entropy(logits, labels):
    """Mean cross-entropy per prompt, -mean_n log softmax(s_n)[y_n] (BBT's default loss). -> (P,)"""
    x, y, single = _check(logits, labels)
    m = x.max(axis=-1, keepdims=True)  # subtract the max so exp never overflows
    logz = m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))  # (P, N)
    gold = np.take_along_axis(x, y[None, :, None], axis=-1)[..., 0]  # (P, N)
    return _out((logz - gold).mean(axis=-1), single)


def hinge(logits, labels, margin: float = 2.0):
    """Multi-class hinge per prompt (BBT uses margin 2 for pair tasks). -> (P,)

    Reading (Crammer-Singer style, summed): mean over examples of sum_{j != y} max(0, margin - (s_y - s_j)).
    Unlike torch's MultiMarginLoss this does not divide the sum by K.
    """
    x, y, single = _check(logits, labels)
    gold = np.take_along_axis(x, y[None, :, None], axis=-1)  # (P, N, 1)
    terms = np.maximum(0.0, margin - (gold - x))  # (P, N, K); the gold column is max(0, margin)
    wrong = np.ones(x.shape[1:], dtype=bool)
    wrong[np.arange(len(y)), y] = False
    return _out((terms * wrong).sum(axis=-1).mean(axis=-1), single)


def accuracy(logits, labels):
    """Fraction of examples whose argmax (first index on ties) is the label. -> (P,)"""
    x, y, single = _check(logits, labels)
    return _out((x.argmax(axis=-1) == y).mean(axis=-1), single)


def confusion_matrix(logits, labels) -> np.ndarray:
    """(K, K) counts of one prompt's predictions: row = true class, column = predicted class."""
    x, y, single = _check(logits, labels)
    if not single:
        raise ValueError("confusion_matrix takes one prompt's (N, K) logits")
    k = x.shape[2]
    return np.bincount(y * k + x[0].argmax(axis=-1), minlength=k * k).reshape(k, k)


def macro_f1(logits, labels):
    """Macro F1 per prompt: mean over classes of 2TP / (2TP + FP + FN). -> (P,)

    As sklearn's f1_score(average="macro"), the mean runs over the classes that occur in the labels
    or in that prompt's predictions; a class in neither is left out.
    """
    x, y, single = _check(logits, labels)
    k = x.shape[2]
    pred = np.eye(k, dtype=np.float64)[x.argmax(axis=-1)]  # (P, N, K)
    true = np.eye(k, dtype=np.float64)[y]  # (N, K)
    tp = (pred * true).sum(axis=1)  # (P, K)
    denom = pred.sum(axis=1) + true.sum(axis=0)  # 2TP + FP + FN
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.where(present, denom, 1.0), 0.0)
    return _out(f1.sum(axis=-1) / present.sum(axis=-1), single)


LOSSES = {"ce": cross_entropy, "hinge": hinge}
METRICS = {"accuracy": accuracy, "f1": macro_f1}
