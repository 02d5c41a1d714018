"""Per-token outputs of one model on one split, flattened to one row per scored position.

Every row holds the gold id, the gold log-prob and the entropy (what the scalar combiners need:
12 bytes a token). The full next-token log-distribution is kept only when a chosen combiner needs
it, as float16: V x 2 bytes a token (8 KiB with the default 4096-token vocabulary), which
`cache_bytes` computes so the job can refuse to start past --max-cache-gb.

The large LM is scored only through the black-box oracle (`score_with_oracle`); the small models
are ours and run in process (`score_in_process`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raydapt.models.heads import token_stats
from raydapt.outputs import write_atomic

__all__ = ["cache_bytes", "score_with_oracle", "score_in_process", "save_cache", "load_cache", "as_batch"]


def cache_bytes(n_tokens: int, vocab_size: int, full: bool) -> int:
    """Bytes one model's cache takes for `n_tokens` scored positions."""
    return n_tokens * (12 + (2 * vocab_size if full else 0))


def _flatten(blocks: np.ndarray, parts: list[dict]) -> dict[str, np.ndarray]:
    out = {"gold": blocks[:, 1:].reshape(-1).astype(np.int64),
           "gold_logprob": np.concatenate([p["logprob"].reshape(-1) for p in parts]).astype(np.float32),
           "entropy": np.concatenate([p["entropy"].reshape(-1) for p in parts]).astype(np.float32)}
    if "full" in parts[0]:
        out["full"] = np.concatenate([p["full"].reshape(-1, p["full"].shape[-1]).astype(np.float16) for p in parts])
    return out


def score_with_oracle(oracle, blocks: np.ndarray, full: bool, rows_per_request: int = 16) -> dict[str, np.ndarray]:
    """The black-box large LM's answers for every block, through the oracle's token_logprobs."""
    lengths = np.full(rows_per_request, blocks.shape[1])
    parts = []
    for i in range(0, len(blocks), rows_per_request):
        ids = blocks[i: i + rows_per_request].astype(np.int64)
        scores = oracle.token_logprobs(ids, lengths[: len(ids)], full=full)
        part = {"logprob": scores.logprob, "entropy": scores.entropy}
        if full:
            part["full"] = scores.full
        parts.append(part)
    return _flatten(blocks, parts)


@torch.no_grad()
def score_in_process(model, blocks: np.ndarray, full: bool, batch: int = 16) -> dict[str, np.ndarray]:
    """A white-box small model's outputs for every block (same statistics as the oracle's)."""
    model.eval()
    parts = []
    for i in range(0, len(blocks), batch):
        ids = torch.from_numpy(blocks[i: i + batch].astype(np.int64))
        parts.append(token_stats(model(input_ids=ids).logits.float(), ids, full=full))
    return _flatten(blocks, parts)


def save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save
    write_atomic(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def load_cache(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(path))


def as_batch(small: dict[str, np.ndarray], large: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The combiners' input arrays from one small and one large cache of the same split."""
    if not np.array_equal(small["gold"], large["gold"]):
        raise ValueError("small and large caches score different tokens")
    out = {"gold": large["gold"], "small_gold": small["gold_logprob"], "large_gold": large["gold_logprob"],
           "small_entropy": small["entropy"], "large_entropy": large["entropy"]}
    if "full" in small and "full" in large:
        out["small_full"], out["large_full"] = small["full"], large["full"]
    return out
