"""Derivative-free optimizers behind one ask/tell interface (pycma and nevergrad); no evaluation inside.

BBT (Sun et al., ICML 2022, Sec. 3.3) searches z with CMA-ES: ask a population, score it (the
caller's business: in-process or on Ray replicas), tell the losses. Every optimizer here pickles
whole (`state_bytes` / `restore`) and a restored one asks exactly what the uninterrupted one would.

numpy's global RNG: pycma draws its samples with np.random.randn and seeds np.random at
construction; nevergrad's parametrization has its own RandomState but several of its optimizers
(NGOpt's portfolio choices, some OnePlusOne variants) call np.random directly. So each optimizer
owns a private copy of the global RNG state and swaps it in around every call into the library:
its trajectory then depends on nothing outside, it leaves the caller's np.random untouched, and
the state travels in the pickle. The swap makes one optimizer call at a time per process a
requirement (no two threads calling into optimizers at once).

Pickling: pycma keeps a reference to np.random.randn (a bound method of numpy's global
RandomState). A plain pickle would copy that RandomState, so a restored optimizer would sample
from a stale copy instead of its own state. `state_bytes` pickles such references by name, and
`__reduce__` routes every pickling (pickle, cloudpickle for Ray, copy.deepcopy) through it.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from typing import Protocol, runtime_checkable

import numpy as np

from raydapt.config import check
from raydapt.errors import UserError
from raydapt.signing import seal, unseal

__all__ = ["Optimizer", "CMAOptimizer", "NevergradOptimizer", "make_optimizer", "restore", "pycma_seed",
           "PYCMA_NAMES"]

PYCMA_NAMES = ("cma", "lq-cma")  # --optimizer names served by pycma (the rest: nevergrad's registry)


@runtime_checkable
class Optimizer(Protocol):
    """ask -> (popsize, dim) candidates; tell their losses (lower is better)."""

    popsize: int
    dim: int

    def ask(self) -> np.ndarray: ...

    def tell(self, solutions: np.ndarray, losses: np.ndarray) -> None: ...

    def stop(self) -> bool: ...

    def best(self) -> tuple[np.ndarray, float]: ...

    def state_bytes(self) -> bytes: ...


def pycma_seed(seed: int) -> int:
    """seed >= 0 -> pycma seed in [1, 2**32 - 1]: seed % (2**32 - 1) + 1.

    pycma reads seed 0 (and None) as "seed from the clock", and np.random.seed takes < 2**32.
    """
    return seed % (2**32 - 1) + 1


def _check_common(dim: int, popsize: int, sigma: float, seed: int, budget: int | None) -> None:
    check(dim >= 1, "intrinsic_dim", f"must be >= 1, got {dim}")
    check(popsize >= 2, "popsize", f"must be >= 2, got {popsize}")
    check(sigma > 0, "sigma", f"must be > 0, got {sigma}")
    check(seed >= 0, "seed", f"must be >= 0, got {seed}")
    check(budget is None or budget >= 1, "budget", f"must be >= 1, got {budget}")


def _global_rng_attr(name: str):
    """np.random.<name>, looked up at unpickling time (see `_Pickler`)."""
    return getattr(np.random, name)


class _Pickler(pickle.Pickler):
    """Pickles methods of numpy's global RandomState by name instead of copying the RandomState."""

    def reducer_override(self, obj):
        if getattr(obj, "__self__", None) is np.random.mtrand._rand:
            return _global_rng_attr, (obj.__name__,)
        return NotImplemented


class _Base:
    """Private global-RNG state, best-so-far bookkeeping, budget and pickling."""

    def __init__(self, dim: int, popsize: int, seed: int, budget: int | None):
        self.dim, self.popsize, self.budget = dim, popsize, budget
        self.evaluations = 0  # losses told so far, injected points included (one teacher call each)
        self._best_x: np.ndarray | None = None
        self._best_loss = float("inf")
        # Derived from the seed, not equal to it, so it is not the same stream as any RandomState(seed).
        words = np.random.SeedSequence(seed, spawn_key=(0x5EED,)).generate_state(4)
        self._np_state = np.random.RandomState(words).get_state()

    @contextlib.contextmanager
    def _own_rng(self):
        outside = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(outside)

    def _record(self, solutions: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        solutions = np.asarray(solutions, dtype=np.float64)
        losses = np.asarray(losses, dtype=np.float64)
        if solutions.ndim != 2 or solutions.shape[1] != self.dim or losses.shape != (len(solutions),):
            raise ValueError(f"tell wants solutions (n, {self.dim}) and losses (n,), "
                             f"got {solutions.shape} and {losses.shape}")
        self.evaluations += len(losses)
        i = int(np.argmin(losses))
        if losses[i] < self._best_loss:  # strict: the first of equal losses stays best
            self._best_loss, self._best_x = float(losses[i]), solutions[i].copy()
        return solutions, losses

    def _budget_spent(self) -> bool:
        return self.budget is not None and self.evaluations >= self.budget

    def best(self) -> tuple[np.ndarray, float]:
        """Best solution told so far and its loss (a copy); before any tell: (None, inf)."""
        return (None if self._best_x is None else self._best_x.copy()), self._best_loss

    def state_bytes(self) -> bytes:
        """The whole optimizer, pickled (library state, private RNG state, best, counters) and sealed
        with this installation's HMAC, so that `restore` unpickles only what raydapt wrote here."""
        buf = io.BytesIO()
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((type(self), self.__dict__))
        return seal(buf.getvalue())

    def __reduce__(self):
        return restore, (self.state_bytes(),)


class CMAOptimizer(_Base):
    """pycma's CMA-ES from z0 = 0 with step sigma (BBT Sec. 3.3; popsize 20, sigma 1 in the paper).

    `tell` accepts more solutions than were asked (GDFO's gradient-refined points): pycma then
    clips the unasked ones to a plausible Mahalanobis length (check_points=None) and uses them all.
    stop(): pycma's own termination criteria, or `budget` losses told.
    """

    def __init__(self, dim: int, popsize: int, sigma: float, seed: int,
                 bounds: tuple[float, float] | None = None, budget: int | None = None):
        _check_common(dim, popsize, sigma, seed, budget)
        super().__init__(dim, popsize, seed, budget)
        import cma

        opts = {"seed": pycma_seed(seed), "popsize": popsize, "verbose": -9,
                "bounds": [None, None] if bounds is None else [float(bounds[0]), float(bounds[1])]}
        with self._own_rng():  # pycma calls np.random.seed(seed) here: that lands in our private state
            self._es = cma.CMAEvolutionStrategy(dim * [0.0], sigma, opts)

    def ask(self) -> np.ndarray:
        with self._own_rng():
            return np.array(self._es.ask(), dtype=np.float64)  # (popsize, dim)

    def tell(self, solutions: np.ndarray, losses: np.ndarray) -> None:
        solutions, losses = self._record(solutions, losses)
        with self._own_rng():
            self._es.tell(list(solutions), [float(v) for v in losses])

    def stop(self) -> bool:
        with self._own_rng():
            return self._budget_spent() or bool(self._es.stop())

    def mean(self) -> np.ndarray:
        """The current distribution mean (a copy): GDFO can start its gradient steps there."""
        return np.array(self._es.mean, dtype=np.float64)

    def sample_std(self) -> float:
        """The root-mean-square per-coordinate std of the sampling distribution: an asked point lies
        about sample_std() * sqrt(dim) from the mean."""
        return float(np.sqrt(np.mean(np.square(self._es.stds))))


class NevergradOptimizer(_Base):
    """Any `nevergrad.optimizers.registry` optimizer over ng.p.Array((dim,)) with mutation sigma.

    Batch ask: built with num_workers=popsize, so popsize ask() calls in a row are legal before any
    tell; the candidate objects are kept and `tell` matches each told row to an asked candidate by
    value (order free). A row matching no asked candidate is told as a new point (not every
    nevergrad optimizer accepts that). stop(): `budget` losses told.

    nevergrad picks its own generation size: its CMA uses max(num_workers, 4 + 3 ln d) (22 at
    d = 500 with popsize 20), so generations can straddle our batches; for a CMA-ES whose
    generation is exactly --popsize use "cma" (pycma). With nevergrad 1.0.12 and numpy 2.4, NGOpt
    fails after a few generations (its MetaModel calls float() on a 1-d array at d = 10; at
    d = 500 its TPA CMA raises "Mean shift samples are expected but missing").
    """

    def __init__(self, name: str, dim: int, popsize: int, budget: int, seed: int, sigma: float = 1.0):
        import nevergrad as ng

        if name not in ng.optimizers.registry:
            raise UserError(f"--optimizer {name!r} is not a nevergrad optimizer; e.g. CMA, NGOpt, TwoPointsDE, "
                            "OnePlusOne (see nevergrad.optimizers.registry)")
        _check_common(dim, popsize, sigma, seed, budget)
        super().__init__(dim, popsize, seed, budget)
        self.name = name
        param = ng.p.Array(shape=(dim,)).set_mutation(sigma=sigma)
        param.random_state = np.random.RandomState(seed % 2**32)
        with self._own_rng():
            try:
                self._opt = ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=popsize)
            except ValueError as e:  # e.g. "... does not support parallelization"
                raise UserError(f"--optimizer {name!r} cannot ask {popsize} candidates at once (--popsize): {e}")
        self._asked: list = []

    def ask(self) -> np.ndarray:
        with self._own_rng():
            self._asked = [self._opt.ask() for _ in range(self.popsize)]
        return np.stack([np.asarray(c.value, dtype=np.float64) for c in self._asked])  # (popsize, dim)

    def tell(self, solutions: np.ndarray, losses: np.ndarray) -> None:
        solutions, losses = self._record(solutions, losses)
        by_value: dict[bytes, list] = {}
        for c in self._asked:
            by_value.setdefault(np.asarray(c.value, dtype=np.float64).tobytes(), []).append(c)
        with self._own_rng():
            for x, loss in zip(solutions, losses):
                matches = by_value.get(x.tobytes())
                cand = matches.pop(0) if matches else self._opt.parametrization.spawn_child(new_value=x)
                self._opt.tell(cand, float(loss))
        self._asked = [c for cs in by_value.values() for c in cs]

    def stop(self) -> bool:
        return self._budget_spent()


def make_optimizer(name: str, dim: int, popsize: int, budget: int, seed: int, sigma: float,
                   bound: float = 0.0) -> Optimizer:
    """"cma" -> pycma's CMAOptimizer; "lq-cma" -> pycma's CMA-ES with its lq surrogate
    (`raydapt.search.lq_cma`); any other name -> nevergrad's registry (case-sensitive: "CMA" is
    nevergrad's CMA-ES). bound > 0 boxes z in [-bound, bound] (pycma's optimizers only)."""
    _check_common(dim, popsize, sigma, seed, budget)
    check(bound >= 0, "bound", f"must be >= 0, got {bound}")
    check(bound == 0 or name in PYCMA_NAMES, "bound", f"needs --optimizer {' or '.join(PYCMA_NAMES)}, got {name!r}")
    bounds = (-bound, bound) if bound else None
    if name == "cma":
        return CMAOptimizer(dim, popsize, sigma, seed, bounds=bounds, budget=budget)
    if name == "lq-cma":
        from raydapt.search.lq_cma import LQCMAOptimizer
        return LQCMAOptimizer(dim, popsize, sigma, seed, bounds=bounds, budget=budget)
    return NevergradOptimizer(name, dim, popsize, budget, seed, sigma=sigma)


def restore(data: bytes) -> Optimizer:
    """An optimizer from `state_bytes()`; anything this installation did not seal is refused unread."""
    payload = unseal(data)
    if payload is None:
        raise ValueError("not an optimizer state sealed by this raydapt installation; refusing to unpickle it")
    obj = pickle.loads(payload)
    if not (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], type) and issubclass(obj[0], _Base)):
        raise ValueError(f"not an optimizer state: unpickled a {type(obj).__name__}")
    cls, state = obj
    opt = cls.__new__(cls)
    opt.__dict__.update(state)
    return opt
