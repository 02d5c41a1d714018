"""CombLM combiners (Ormazabal, Artetxe, Agirre, EMNLP 2023), in plain PyTorch.

A small fine-tuned expert LM (P_S) and a large black-box LM (P_L) share one vocabulary of size V.
A combiner mixes their next-token distributions in probability space,

    P = lam * P_S + (1 - lam) * P_L,

where lam = sigmoid(a) weights the SMALL model and `a` is what a combiner outputs. Scalar kinds
give one lam per token (shape (B, 1)); vector kinds give one lam per vocabulary entry (shape
(B, V)), so their mixture is renormalised over the vocabulary, which needs both full
distributions. Every learned combiner starts at lam = 0.5 (the `mean` combiner) and is fitted
with Adam on the gold next-token NLL of a held-out validation set.

A "token batch" is a dict of tensors, one row per scored token: "gold" (B,) ids, "small_gold"
and "large_gold" (B,) gold log-probs, "small_entropy" and "large_entropy" (B,) entropies in
nats, and optionally "small_full" and "large_full" (B, V) full log-probs (possibly float16).
"arrays" is the same as a dict of numpy arrays with N rows; batches are sliced from it so a big
float16 array is never converted whole.

Determinism: a combiner's initial weights come from torch's global RNG, so callers seed torch
before constructing one (`make_combiner` does both); `fit` draws its batch order from
numpy's default_rng(seed). Same seed and data give bit-identical parameters on one machine.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydapt.errors import UserError

__all__ = ["fit_and_evaluate", "balance_fits", "COMBINERS", "LEARNED", "needs_full", "Combiner", "make_combiner", "token_batch",
           "mixed_logprobs", "mixed_gold_logprob", "default_lr", "fit", "evaluate_nll", "perplexity",
           "single_nll", "max_prob_oracle_nll", "proxy_tuning_gold_logprob", "proxy_tuning_nll",
           "combiner_state", "load_combiner"]

COMBINERS = ("mean", "constant_scalar", "constant_vector", "entropy_scalar", "entropy_vector",
             "full_scalar", "full_vector")
LEARNED = COMBINERS[1:]
_VECTOR = ("constant_vector", "entropy_vector", "full_vector")
_SCALAR_KEYS = ("gold", "small_gold", "large_gold", "small_entropy", "large_entropy")
_FULL_KEYS = ("small_full", "large_full")
# Log-probs below this are treated as this: exp() of it is 0 in float32, and it keeps
# logaddexp(-inf, -inf) and its gradient from turning into NaN.
_LOG_FLOOR = -1e4


def needs_full(kind: str) -> bool:
    """Whether `kind` reads the full distributions: vector kinds renormalise over them, full_* take them as input."""
    _check_kind(kind)
    return kind in _VECTOR or kind.startswith("full_")


def _check_kind(kind: str) -> None:
    if kind not in COMBINERS:
        raise UserError(f"unknown combiner {kind!r}; accepted: {', '.join(COMBINERS)}")


def _as_float(x: Tensor) -> Tensor:
    """float16/bfloat16 storage (and integers) to float32, floored, so sums and exps are accurate."""
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    return x.clamp_min(_LOG_FLOOR)


def _full(batch: Mapping[str, Tensor], which: str) -> Tensor:
    key = f"{which}_full"
    if key not in batch:
        raise UserError(f"this combiner needs the full next-token distributions, but the batch has no {key!r}")
    return _as_float(batch[key])


class Combiner(nn.Module):
    """Outputs the logit a of lam = sigmoid(a), the weight of the small model, per token (and per entry for vectors).

    entropy_* and full_* use the paper's network: BatchNorm1d (no affine) on the features, `layers`
    x (Linear -> ReLU), and a final Linear initialised to zero so training starts from the mean.
    """

    def __init__(self, kind: str, vocab_size: int, hidden: int = 512, layers: int = 2):
        super().__init__()
        _check_kind(kind)
        if vocab_size < 1 or hidden < 1 or layers < 0:
            raise UserError("combiner needs vocab_size >= 1, hidden >= 1, layers >= 0; "
                            f"got {vocab_size}, {hidden}, {layers}")
        self.kind, self.vocab_size = kind, vocab_size
        self.is_vector = kind in _VECTOR
        out = vocab_size if self.is_vector else 1
        self.logit = nn.Parameter(torch.zeros(out)) if kind.startswith("constant_") else None
        self.net = None
        if kind.startswith(("entropy_", "full_")):
            self.net = _mlp(2 if kind.startswith("entropy_") else 2 * vocab_size, hidden, layers, out)

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The network's input: the two entropies (B, 2), or the two full probability distributions (B, 2V)."""
        if self.kind.startswith("entropy_"):
            return torch.stack([_as_float(batch["small_entropy"]), _as_float(batch["large_entropy"])], dim=-1)
        return torch.cat([_full(batch, "small").exp(), _full(batch, "large").exp()], dim=-1)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits a, (B, 1) for scalar kinds or (B, V) for vector kinds."""
        rows = batch["gold"].shape[0]
        if self.net is not None:
            return self.net(self.features(batch))
        if self.logit is not None:
            return self.logit.expand(rows, -1)
        return torch.zeros(rows, 1, device=batch["gold"].device)  # mean: lam = 0.5

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, vocab_size={self.vocab_size}"


def _mlp(inputs: int, hidden: int, layers: int, out: int) -> nn.Sequential:
    """BatchNorm -> layers x (Linear, ReLU) -> Linear with a zero final layer (lam starts at 0.5)."""
    mods: list[nn.Module] = [nn.BatchNorm1d(inputs, affine=False)]
    width = inputs
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    last = nn.Linear(width, out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods, last)


def make_combiner(kind: str, vocab_size: int, seed: int, **kw) -> Combiner:
    """Seed torch, then construct: the hidden layers' random init is then reproducible."""
    torch.manual_seed(seed)
    return Combiner(kind, vocab_size, **kw)


def token_batch(arrays: Mapping[str, np.ndarray], rows, *, full: bool, device=None) -> dict[str, Tensor]:
    """Tensors for `rows` (a slice or index array) of the numpy arrays; full ones only when asked, as float32."""
    keys = _SCALAR_KEYS + (_FULL_KEYS if full else ())
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise UserError(f"token arrays lack {', '.join(missing)}; they need {', '.join(keys)}")
    batch = {}
    for k in keys:
        part = np.asarray(arrays[k][rows])
        # astype copies (arrays from the object store are read-only), so torch owns writable memory
        part = part.astype(np.int64) if k == "gold" else part.astype(np.float32)
        batch[k] = torch.from_numpy(part).to(device)
    return batch


def _joint(batch: Mapping[str, Tensor], logits: Tensor) -> Tensor:
    """(B, V) unnormalised log of lam * P_S + (1 - lam) * P_L, from the full log-probs."""
    return torch.logaddexp(F.logsigmoid(logits) + _full(batch, "small"), F.logsigmoid(-logits) + _full(batch, "large"))


def mixed_logprobs(batch: Mapping[str, Tensor], logits: Tensor) -> Tensor:
    """(B, V) log-probs of the mixture, renormalised over the vocabulary (works for scalar logits too)."""
    joint = _joint(batch, logits)
    return joint - joint.logsumexp(dim=-1, keepdim=True)


def mixed_gold_logprob(batch: Mapping[str, Tensor], logits: Tensor) -> Tensor:
    """(B,) log P(gold) of the mixture, in log space so tiny probabilities neither underflow nor give NaN gradients.

    Scalar logits use only the gold log-probs; vector logits renormalise over the full distributions.
    """
    if logits.shape[-1] == 1:
        a = logits.squeeze(-1)
        return torch.logaddexp(F.logsigmoid(a) + _as_float(batch["small_gold"]),
                               F.logsigmoid(-a) + _as_float(batch["large_gold"]))
    joint = _joint(batch, logits)
    gold = batch["gold"].long().unsqueeze(-1)
    return joint.gather(-1, gold).squeeze(-1) - joint.logsumexp(dim=-1)


def default_lr(kind: str) -> float:
    """The paper's learning rates: 1e-2 for the per-entry constant, 2e-3 for the rest."""
    _check_kind(kind)
    return 1e-2 if kind == "constant_vector" else 2e-3


def _num_rows(arrays: Mapping[str, np.ndarray]) -> int:
    if "gold" not in arrays:
        raise UserError("token arrays lack 'gold'")
    return len(arrays["gold"])


def _device(module: nn.Module):
    return next(module.parameters(), torch.empty(0)).device


def _train_batches(order: np.ndarray, batch_tokens: int):
    """Consecutive chunks of `order`; a last chunk of 1 row is dropped since BatchNorm needs 2 in training."""
    for start in range(0, len(order), batch_tokens):
        rows = order[start:start + batch_tokens]
        if len(rows) >= 2:
            yield rows


def fit(combiner: Combiner, arrays: Mapping[str, np.ndarray], *, lr: float | None = None, batch_tokens: int = 1024,
        epochs: int = 1, seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fit with Adam on the mean gold NLL; return the per-step losses (empty for `mean`, which has no parameters).

    Batches follow numpy default_rng(seed)'s permutation each epoch, so the same seed, data and
    initial weights (see `make_combiner`) give bit-identical parameters. `on_step(step, loss)` is
    called after each update with the 1-based step number. The combiner is left in eval mode.
    """
    params = [p for p in combiner.parameters() if p.requires_grad]
    if not params:
        combiner.eval()
        return []
    if batch_tokens < 2:
        raise UserError(f"batch_tokens must be >= 2 (BatchNorm needs 2 rows), got {batch_tokens}")
    n = _num_rows(arrays)
    if n < 2:
        raise UserError(f"fitting a combiner needs at least 2 tokens, got {n}")
    opt = torch.optim.Adam(params, lr=default_lr(combiner.kind) if lr is None else lr)
    rng, full, device = np.random.default_rng(seed), needs_full(combiner.kind), _device(combiner)
    losses: list[float] = []
    combiner.train()
    for _ in range(epochs):
        for rows in _train_batches(rng.permutation(n), batch_tokens):
            batch = token_batch(arrays, rows, full=full, device=device)
            loss = -mixed_gold_logprob(batch, combiner(batch)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(len(losses), losses[-1])
    combiner.eval()
    return losses


@torch.no_grad()
def evaluate_nll(combiner: Combiner, arrays: Mapping[str, np.ndarray], batch_tokens: int = 4096) -> float:
    """Mean gold NLL in nats/token, in eval mode (BatchNorm's running stats); the previous mode is restored."""
    n = _num_rows(arrays)
    if n == 0:
        raise UserError("cannot evaluate a combiner on 0 tokens")
    was_training, full, device = combiner.training, needs_full(combiner.kind), _device(combiner)
    combiner.eval()
    total = 0.0
    for start in range(0, n, batch_tokens):
        batch = token_batch(arrays, slice(start, start + batch_tokens), full=full, device=device)
        total -= mixed_gold_logprob(batch, combiner(batch)).double().sum().item()
    combiner.train(was_training)
    return total / n


def perplexity(nll: float) -> float:
    """exp of a mean NLL in nats."""
    return math.exp(nll)


def single_nll(arrays: Mapping[str, np.ndarray], which: str) -> float:
    """One model alone ("small" or "large"): the baseline every combiner should beat."""
    if which not in ("small", "large"):
        raise UserError(f"unknown model {which!r}; accepted: small, large")
    return -float(np.mean(arrays[f"{which}_gold"], dtype=np.float64))


def max_prob_oracle_nll(arrays: Mapping[str, np.ndarray]) -> float:
    """Per-token best of the two models: an upper bound on any combination (unnormalised, as in the paper)."""
    best = np.maximum(arrays["small_gold"], arrays["large_gold"])
    return -float(np.mean(best, dtype=np.float64))


def proxy_tuning_gold_logprob(large_full: Tensor, expert_full: Tensor, untuned_full: Tensor, gold: Tensor,
                              alpha: float = 1.0) -> Tensor:
    """Proxy tuning: log_softmax(large + alpha * (expert - untuned)) at the gold ids.

    Log-probs serve as logits: each differs from the model's logits by a per-row constant, which
    cancels under softmax.
    """
    large, expert, untuned = _as_float(large_full), _as_float(expert_full), _as_float(untuned_full)
    logp = torch.log_softmax(large + alpha * (expert - untuned), dim=-1)
    return logp.gather(-1, gold.long().unsqueeze(-1)).squeeze(-1)


def proxy_tuning_nll(large_full: np.ndarray, expert_full: np.ndarray, untuned_full: np.ndarray, gold: np.ndarray,
                     alpha: float = 1.0, batch_tokens: int = 4096) -> float:
    """Mean gold NLL of proxy tuning over numpy arrays, batched so float16 arrays are converted a slice at a time."""
    n = len(gold)
    if n == 0:
        raise UserError("cannot evaluate proxy tuning on 0 tokens")
    total = 0.0
    for start in range(0, n, batch_tokens):
        part = slice(start, start + batch_tokens)
        tensors = [torch.from_numpy(np.asarray(a[part], dtype=np.float32))
                   for a in (large_full, expert_full, untuned_full)]
        ids = torch.from_numpy(np.asarray(gold[part], dtype=np.int64))
        total -= proxy_tuning_gold_logprob(*tensors, ids, alpha=alpha).double().sum().item()
    return total / n


def combiner_state(combiner: Combiner) -> dict[str, Tensor]:
    """The state dict (BatchNorm running stats included) as contiguous CPU tensors, ready for safetensors."""
    return {k: v.detach().cpu().contiguous() for k, v in combiner.state_dict().items()}


def load_combiner(kind: str, vocab_size: int, state: Mapping[str, Tensor], **kw) -> Combiner:
    """Rebuild a fitted combiner (eval mode); `kw` must match the hidden/layers it was built with."""
    combiner = Combiner(kind, vocab_size, **kw)
    try:
        combiner.load_state_dict(dict(state))
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400]
        raise UserError(f"saved combiner state does not fit kind={kind!r}, vocab_size={vocab_size}, {kw}: "
                        f"{detail}") from None
    return combiner.eval()


def fit_and_evaluate(kind: str, fit_arrays: Mapping[str, np.ndarray], test_arrays: Mapping[str, Mapping],
                     options: Mapping) -> dict:
    """Fit one combiner on one thread and return its state (numpy), losses, test NLL per split and
    when it ran: the unit of work whether a Ray task or a Ray Train worker runs it."""
    import time

    began = time.time()
    torch.set_num_threads(1)  # one thread whoever runs it: the same bits on tasks and Train workers
    combiner = make_combiner(kind, options["vocab_size"], options["seed"], hidden=options["hidden"],
                             layers=options["layers"])
    losses = fit(combiner, fit_arrays, batch_tokens=options["batch_tokens"], epochs=options["epochs"],
                 seed=options["seed"])
    nll = {split: evaluate_nll(combiner, arrays) for split, arrays in test_arrays.items()}
    state = {k: v.numpy() for k, v in combiner_state(combiner).items()}
    return {"kind": kind, "state": state, "losses": losses, "nll": nll, "began": began, "ended": time.time()}


# Relative single-thread fit times, measured on the quick preset (seconds, 2026-12-03: full_vector
# 54, entropy_vector 39, constant_vector 32, full_scalar 31, the scalar kinds about 1): the kinds
# that read or output the full distributions cost 30-50x the others.
_FIT_COST = {"mean": 0.0, "constant_scalar": 1.0, "entropy_scalar": 1.0, "constant_vector": 32.0,
             "entropy_vector": 39.0, "full_scalar": 31.0, "full_vector": 54.0}


def balance_fits(kinds: list[str], workers: int) -> list[int]:
    """The worker of each fit: longest first, each to the least loaded worker (ties: lowest rank).

    Round-robin put all three vector kinds on one of two workers (127 s against 37 s on the quick
    preset). Which worker fits a combiner changes no bit of it, and the assignment depends only on
    the kinds and the worker count, so every worker computes the same one."""
    load, owner = [0.0] * workers, [0] * len(kinds)
    for i in sorted(range(len(kinds)), key=lambda i: (-_FIT_COST[kinds[i]], i)):
        owner[i] = min(range(workers), key=lambda w: (load[w], w))
        load[owner[i]] += _FIT_COST[kinds[i]]
    return owner
