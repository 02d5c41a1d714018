"""The black-box oracle: the only way raydapt's methods reach the frozen large LM.

An oracle answers, for a batch, label-word logits of prompted inputs or next-token statistics of
sequences. It never returns weights, hidden states or gradients. It counts what it serves and
refuses a request that would exceed its budget. `ShardedOracle` implements the protocol over a
pool of pipeline replicas (in-process or Ray actors; see `actors.pipeline`): it cuts each request
into micro-batches of a fixed size, sorted by length, so that every row is computed with the same
shapes whatever the number of replicas or stages, and results do not depend on either (bitwise;
another micro-batch size changes them within float rounding).

Prefix sharing (on unless the pool's spec turns it off): when every row of a label-logits request
starts with the same tokens, which hold the prompt (add, deep) or come before it (cat), each
micro-batch is a tile of C candidates x m examples of similar length; the stages run the prompted
prefix once per candidate of the tile and the rows' remaining positions against its keys and values
(`raydapt.models.prefix`). The tile shape is chosen from the request and the micro-batch size
alone, so results still do not depend on R or S.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from raydapt.errors import UserError

__all__ = ["Usage", "Budget", "BudgetExceededError", "BlackBoxOracle", "TokenScores", "ModelInfo",
           "ReplicaPool", "ShardedOracle", "PROMPT_MODES", "shared_prefix",
           "sharing_plan", "GrayBoxOracle", "GrayBoxRequest", "GrayUsage"]

PROMPT_MODES = ("add", "cat", "deep")


@dataclass
class Usage:
    """What an oracle has served. One call = one prompt scored on a whole batch (BBT's API call)."""
    calls: int = 0
    examples: int = 0
    tokens: int = 0
    requests: int = 0

    def plus(self, other: "Usage") -> "Usage":
        return Usage(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """Hard limits; None means unlimited."""
    calls: int | None = None
    examples: int | None = None
    tokens: int | None = None


class BudgetExceededError(RuntimeError):
    """A request would take the oracle past its budget; nothing was computed or charged."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model API publishes about itself: sizes, never weights."""
    model_type: str
    n_layers: int
    vocab_size: int
    embed_dim: int       # width of the input embeddings (where BBT's prompt lives)
    hidden_dim: int      # width of the residual stream (where BBTv2's deep prompts live)
    max_positions: int


@dataclass
class TokenScores:
    """Next-token statistics for N sequences; position t (1..len-1) lives at column t-1."""
    lengths: np.ndarray          # (N,)
    logprob: np.ndarray          # (N, T-1)
    entropy: np.ndarray          # (N, T-1)
    topk_ids: np.ndarray | None = None       # (N, T-1, k)
    topk_logprobs: np.ndarray | None = None  # (N, T-1, k)
    full: np.ndarray | None = None           # (N, T-1, V)


class BlackBoxOracle(Protocol):
    info: ModelInfo
    usage: Usage
    budget: Budget

    def label_logits(self, input_ids: np.ndarray, lengths: np.ndarray, label_ids: list[int],
                     prompts: np.ndarray | None = None, mode: str = "add", offset: int = 0) -> np.ndarray:
        """(P,N,K) logits of the K label tokens at each row's answer position (length-1)."""

    def token_logprobs(self, input_ids: np.ndarray, lengths: np.ndarray, top_k: int = 0,
                       full: bool = False) -> TokenScores:
        """Next-token statistics for every position t >= 1 of every sequence."""

    def statistics(self, input_ids: np.ndarray, lengths: np.ndarray) -> dict:
        """Scale statistics a prompt search needs, as scalars: `embedding_std` (std of the token
        embedding matrix, BBT's scale for A) and `hidden_std` (per block input, 3-sigma clipped std
        over the real positions of these inputs, BBTv2's per-layer scale)."""


@dataclass
class GrayBoxRequest:
    """N sequences for a frozen LM that is differentiated through (numpy arrays).

    `prompt` (N, L, E) is inserted at positions [offset, offset + L) of each sequence, so a row of
    `lengths[i]` tokens is `lengths[i] + L` positions long. `inputs_embeds` (N, T, E), when given,
    replaces the token embeddings of `input_ids` (a connector feeding the LM). `labels` (N, T) are
    in token space, Hugging Face style (-100 ignored; position t's logits predict token t + 1; the
    last prompt vector predicts the token after the prompt); `positions` (N, K) index the prompted
    sequence, for logits there.
    """
    input_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray | None = None
    prompt: np.ndarray | None = None
    offset: int = 0
    inputs_embeds: np.ndarray | None = None
    positions: np.ndarray | None = None
    hidden: bool = False


@dataclass
class GrayUsage:
    """What a gray-box oracle has served: rows and (real) positions through forward and backward."""
    requests: int = 0
    examples: int = 0
    forward_tokens: int = 0
    backward_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class GrayBoxOracle(Protocol):
    """A frozen LM that is differentiated through but never changed or shown: it returns outputs
    of prompted inputs and the vector-Jacobian product back to its input embeddings, never weights.
    Its weights have requires_grad=False and stay where they are served. A black-box oracle
    (`BlackBoxOracle`, `ShardedOracle`) has none of these calls, and its stages refuse them."""
    info: ModelInfo
    usage: GrayUsage

    def forward(self, request: GrayBoxRequest) -> tuple[dict[str, np.ndarray], Any]:
        """({"loss": (N,) summed token cross-entropy over `labels`, "logits": (N, K, V) at
        `positions`, "hidden": (N, T', D) final hidden states}, only those asked for; a handle for
        `backward`)."""

    def backward(self, handle: Any, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Given d(objective)/d(each output of `forward`), return {"prompt": (N, L, E),
        "inputs_embeds": (N, T, E)} (those the request had) and release what forward kept."""


class ReplicaPool(Protocol):
    """Where micro-batches run: `actors.pipeline.LocalPool` (in-process) or `RayPool` (actors)."""
    info: ModelInfo
    n_replicas: int
    prefix_sharing: bool  # PoolSpec.prefix_sharing: run a shared prompt prefix once per candidate

    def put(self, value: Any) -> Any: ...
    def submit(self, replica: int, micro_batch: dict, prompts: Any) -> Any: ...
    def gather(self, handles: list) -> list: ...


@dataclass
class ShardedOracle:
    """The oracle protocol over a pool of pipeline replicas, with accounting and a budget."""
    pool: ReplicaPool
    micro_batch_size: int = 32
    budget: Budget = field(default_factory=Budget)
    usage: Usage = field(default_factory=Usage)
    reporter: Any = None  # optional: .request(cost: Usage, seconds) after every request (metrics)
    prefix_sharing: bool | None = None  # None: as the pool's PoolSpec.prefix_sharing says

    @property
    def info(self) -> ModelInfo:
        return self.pool.info

    # --- accounting --------------------------------------------------------------------------
    def _charge(self, cost: Usage) -> None:
        after = self.usage.plus(cost)
        for name in ("calls", "examples", "tokens"):
            limit = getattr(self.budget, name)
            if limit is not None and getattr(after, name) > limit:
                raise BudgetExceededError(
                    f"oracle budget exceeded: this request needs {getattr(cost, name)} {name}, "
                    f"{getattr(self.usage, name)} of {limit} are used ({limit - getattr(self.usage, name)} left)")
        self.usage = after
        self._pending = cost

    # --- protocol ----------------------------------------------------------------------------
    def label_logits(self, input_ids, lengths, label_ids, prompts=None, mode="add", offset=0) -> np.ndarray:
        input_ids, lengths = _check_batch(input_ids, lengths, self.info)
        prompts = self._check_prompts(prompts, mode, offset, lengths)
        n_prompts = 1 if prompts is None else prompts.shape[0]
        extra = prompts.shape[-2] if (prompts is not None and mode == "cat") else 0
        if int(lengths.max()) + extra > self.info.max_positions:
            raise UserError(f"a prompted input of {int(lengths.max()) + extra} tokens exceeds the model's "
                            f"context of {self.info.max_positions}")
        label_ids = [int(i) for i in label_ids]
        if not label_ids or min(label_ids) < 0 or max(label_ids) >= self.info.vocab_size:
            raise UserError(f"label token ids {label_ids} must be in [0, {self.info.vocab_size})")
        self._charge(Usage(calls=n_prompts, examples=n_prompts * len(lengths),
                           tokens=n_prompts * int((lengths + extra).sum()), requests=1))
        common = {"kind": "labels", "label_ids": np.asarray(label_ids), "mode": mode, "offset": offset}
        sharing = self.prefix_sharing
        if sharing is None:
            sharing = getattr(self.pool, "prefix_sharing", True)
        plan = None
        if sharing:
            plan = sharing_plan(input_ids, lengths, n_prompts, 0 if prompts is None else prompts.shape[-2], mode,
                                offset, self.micro_batch_size)
        if plan is None:
            rows = _rows_by_length(lengths, n_prompts)             # (P*N, 2): (prompt, example)
            real = list(_chunks(rows, self.micro_batch_size, pad=False))
            batches = []
            for chunk in _chunks(rows, self.micro_batch_size):
                ex = chunk[:, 1]
                batches.append(common | {"input_ids": input_ids[ex, : int(lengths[ex].max())],
                                         "answer_pos": lengths[ex] - 1 + extra, "prompt_index": chunk[:, 0]})
        else:
            real, batches = _shared_batches(input_ids, lengths, n_prompts, plan, common)
        results = self._run(batches, prompts)
        out = np.zeros((n_prompts, len(lengths), len(label_ids)), np.float32)
        for chunk, res in zip(real, results):
            out[chunk[:, 0], chunk[:, 1]] = res[: len(chunk)]
        return out

    def token_logprobs(self, input_ids, lengths, top_k=0, full=False) -> TokenScores:
        input_ids, lengths = _check_batch(input_ids, lengths, self.info)
        if not 0 <= top_k <= self.info.vocab_size:
            raise UserError(f"--top-k must be in [0, {self.info.vocab_size}], got {top_k}")
        self._charge(Usage(calls=1, examples=len(lengths), tokens=int(lengths.sum()), requests=1))
        rows = _rows_by_length(lengths, 1)
        batches = [{"kind": "tokens", "input_ids": input_ids[c[:, 1], : int(lengths[c[:, 1]].max())],
                    "top_k": top_k, "full": full} for c in _chunks(rows, self.micro_batch_size)]
        results = self._run(batches, None)
        width = input_ids.shape[1] - 1
        scores: dict[str, np.ndarray] = {}
        for chunk, res in zip(_chunks(rows, self.micro_batch_size, pad=False), results):
            for name, value in res.items():
                if name not in scores:
                    scores[name] = np.zeros((len(lengths), width, *value.shape[2:]), value.dtype)
                scores[name][chunk[:, 1], : value.shape[1]] = value[: len(chunk)]
        return TokenScores(lengths=lengths, **scores)

    def statistics(self, input_ids, lengths) -> dict:
        input_ids, lengths = _check_batch(input_ids, lengths, self.info)
        self._charge(Usage(calls=1, examples=len(lengths), tokens=int(lengths.sum()), requests=1))
        mb = {"kind": "statistics", "input_ids": input_ids[:, : int(lengths.max())], "lengths": lengths}
        return self._run([mb], None)[0]

    # --- execution ---------------------------------------------------------------------------
    def _run(self, batches: list[dict], prompts: np.ndarray | None) -> list:
        """Micro-batch i goes to replica i mod R; all are in flight at once (pipelined)."""
        began = time.perf_counter()
        shared = None if prompts is None else self.pool.put(prompts)
        handles = [self.pool.submit(i % self.pool.n_replicas, mb, shared) for i, mb in enumerate(batches)]
        results = self.pool.gather(handles)
        if self.reporter is not None:
            self.reporter.request(self._pending, time.perf_counter() - began)
        return results

    def _check_prompts(self, prompts, mode, offset, lengths) -> np.ndarray | None:
        if mode not in PROMPT_MODES:
            raise UserError(f"prompt mode {mode!r} is not one of {list(PROMPT_MODES)}")
        if prompts is None:
            return None
        prompts = np.ascontiguousarray(prompts, dtype=np.float32)
        info = self.info
        expected = (("P", info.n_layers, "L", info.hidden_dim) if mode == "deep" else ("P", "L", info.embed_dim))
        if prompts.ndim != len(expected) or prompts.shape[-1] != expected[-1] or (
                mode == "deep" and prompts.shape[1] != info.n_layers):
            raise UserError(f"{mode} prompts must have shape {expected}, got {prompts.shape}")
        if mode != "cat" and offset + prompts.shape[-2] > int(lengths.min()):
            raise UserError(f"prompt slots [{offset}, {offset + prompts.shape[-2]}) run past the shortest "
                            f"input ({int(lengths.min())} tokens): encode inputs with the placeholder slots")
        return prompts


def _check_batch(input_ids, lengths, info: ModelInfo) -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if input_ids.ndim != 2 or lengths.shape != (input_ids.shape[0],) or len(lengths) == 0:
        raise UserError(f"input_ids must be (N, T) with lengths (N,), N >= 1; got {input_ids.shape}, {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > input_ids.shape[1]:
        raise UserError(f"lengths must be in [1, {input_ids.shape[1]}]")
    if int(lengths.max()) > info.max_positions:
        raise UserError(f"a sequence of {int(lengths.max())} tokens is longer than the model's context "
                        f"of {info.max_positions}")
    ids = input_ids[np.arange(input_ids.shape[1]) < lengths[:, None]]
    if ids.min() < 0 or ids.max() >= info.vocab_size:
        raise UserError(f"token ids must be in [0, {info.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
    return input_ids, lengths


def _rows_by_length(lengths: np.ndarray, n_prompts: int) -> np.ndarray:
    """All (prompt, example) rows, examples in stable length order, so micro-batches pad little."""
    order = np.argsort(lengths, kind="stable")
    prompt_idx = np.tile(np.arange(n_prompts), len(order))
    example_idx = np.repeat(order, n_prompts)
    return np.stack([prompt_idx, example_idx], axis=1)


def shared_prefix(input_ids: np.ndarray, lengths: np.ndarray, prompt_length: int, mode: str,
                  offset: int) -> int | None:
    """How many leading tokens every row shares and the stages run once per candidate, or None
    when no prefix can be shared: it must hold the prompt slots (add, deep) or reach the prompt's
    insertion point (cat), and leave every row at least its answer position of its own."""
    head = input_ids[:, : int(lengths.min()) - 1]
    same = (head == head[:1]).all(0)
    split = int(same.shape[0] if same.all() else np.argmin(same))
    if prompt_length == 0:
        need = 1
    else:
        need = offset if mode == "cat" else offset + prompt_length
    return split if split >= need else None


# Sharing runs every block twice per micro-batch (prefix, then rows): below this saving in computed
# positions it costs more than it saves on small models, and the request runs unshared.
SHARING_WORTH = 0.8


def sharing_plan(input_ids: np.ndarray, lengths: np.ndarray, n_prompts: int, prompt_length: int, mode: str,
                 offset: int, micro_batch_size: int) -> dict | None:
    """How a label-logits request is cut when it shares a prefix: {"split": shared tokens,
    "prefix": prefix positions (split, plus the prompt in cat mode), "examples" m and "candidates" c
    per micro-batch, "positions": computed positions relative to the unshared path}; None when
    nothing can be shared or sharing would compute more than SHARING_WORTH of the unshared positions."""
    split = shared_prefix(input_ids, lengths, prompt_length, mode, offset)
    if split is None:
        return None
    extra = prompt_length if mode == "cat" else 0
    prefix = split + extra
    m, c, cost = _tile(lengths - split, n_prompts, micro_batch_size, prefix)
    rows = _rows_by_length(lengths, n_prompts)
    unshared = sum(len(chunk) * (int(lengths[chunk[:, 1]].max()) + extra)
                   for chunk in _chunks(rows, micro_batch_size))
    if cost > SHARING_WORTH * unshared:
        return None
    return {"split": split, "prefix": prefix, "examples": m, "candidates": c, "positions": cost / unshared}


def _tile(lengths: np.ndarray, n_prompts: int, size: int, prefix: int) -> tuple[int, int, int]:
    """(m, c, positions): micro-batches of c candidates x m examples (c * m <= size), the shape that
    computes the fewest positions (each tile's prefix once per candidate, its rows padded to its
    longest) for this request. It depends on the request and `size` only, never on R or S."""
    ordered = np.sort(lengths)
    best = None
    for m in range(1, min(size, len(lengths)) + 1):
        c = min(size // m, n_prompts)
        longest = ordered[np.minimum(np.arange(m - 1, len(ordered) + m - 1, m), len(ordered) - 1)]
        cost = -(-n_prompts // c) * c * (len(longest) * prefix + m * int(longest.sum()))
        if best is None or cost <= best[0]:
            best = (cost, m, c)
    return best[1], best[2], best[0]


def _shared_batches(input_ids, lengths, n_prompts: int, plan: dict, common: dict
                    ) -> tuple[list[np.ndarray], list[dict]]:
    """Micro-batches that share each candidate's prefix (`sharing_plan`): ([(rows, 2) real (prompt,
    example) rows of each], [micro-batch dicts]). Every micro-batch has c * m rows and c prefixes
    (the last ones repeated where a tile is short)."""
    split, m, c = plan["split"], plan["examples"], plan["candidates"]
    order = np.argsort(lengths, kind="stable")
    real, batches = [], []
    for start in range(0, len(order), m):
        examples = order[start:start + m]
        width = int(lengths[examples].max())
        for first in range(0, n_prompts, c):
            cands = np.arange(first, min(first + c, n_prompts))
            rows = np.stack([np.repeat(cands, len(examples)), np.tile(examples, len(cands))], 1)
            real.append(rows)
            rows = np.concatenate([rows, np.repeat(rows[-1:], c * m - len(rows), 0)])
            ex = rows[:, 1]
            batches.append(common | {
                "shared": True, "prefix_ids": input_ids[0, :split],
                "prefix_index": np.concatenate([cands, np.repeat(cands[-1:], c - len(cands))]),
                "owner": rows[:, 0] - first, "prompt_index": rows[:, 0],
                "input_ids": input_ids[ex, split:width], "answer_pos": lengths[ex] - 1 - split})
    return real, batches


def _chunks(rows: np.ndarray, size: int, pad: bool = True):
    """Fixed-size chunks; with `pad`, the last is filled up by repeating its last row (fixed shapes)."""
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        if pad and len(chunk) < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        yield chunk
