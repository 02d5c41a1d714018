"""Split a decoder into S contiguous stages balanced by their work per token.

A pipeline runs at the pace of its slowest stage, so stages are balanced by compute, not memory:
the caller counts each block's and each extra's multiply-adds per token (their parameters, less
the embedding tables, which are looked up). Counting the embeddings as work put the default 4-layer
LM's layers 2/2, whose last stage (2 blocks + the 4096-word head) took 1.8x the first stage's time
in a gray-box training step; 3/1 takes 0.85x.
"""
from __future__ import annotations

from raydapt.errors import UserError

__all__ = ["plan_stages"]


def plan_stages(layer_costs: list[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the largest stage's cost.

    `layer_costs` are the blocks' costs; the first stage also carries `first_extra` (what it runs
    before the blocks), the last `last_extra` (final norm and LM head). Every stage gets at least
    one block. Exact dynamic programme over split points: O(S * L^2), trivial for any real depth.
    """
    n_layers = len(layer_costs)
    if n_stages < 1:
        raise UserError(f"--stages must be at least 1, got {n_stages}")
    if n_stages > n_layers:
        raise UserError(f"--stages {n_stages}: the model has {n_layers} layers, so at most {n_layers} stages")
    prefix = [0]
    for p in layer_costs:
        prefix.append(prefix[-1] + p)

    def cost(start: int, stop: int) -> int:
        return (prefix[stop] - prefix[start] + (first_extra if start == 0 else 0)
                + (last_extra if stop == n_layers else 0))

    inf = float("inf")
    # best[s][j]: smallest max-stage cost covering layers [0, j) with s stages; cut[s][j]: last split.
    best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, n_layers + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n_layers
    for s in range(n_stages, 0, -1):
        bounds.append(range(cut[s][j], j))
        j = cut[s][j]
    return bounds[::-1]
