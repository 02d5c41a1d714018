"""lq-CMA-ES (Hansen, GECCO 2019) as a batched ask/tell optimizer: a generic peer that saves calls.

pycma's `cma.fitness_models.SurrogatePopulation(fitness)(X)` calls the fitness point by point. This
is the same procedure with the true evaluations handed out in batches, so that each round is one
oracle request:

1. a CMA-ES generation X (popsize points) is asked; pycma's `LQModel` (linear, then diagonal, then
   full quadratic, fitted to the ranks of what it has seen) orders X by its own prediction;
2. round r asks the first n_r not-yet-evaluated points of that order for true losses
   (n_1 = 1 + max(2% of P, 3 / truncation_ratio - model size), then n_{r+1} = n_r + ceil(n_r / 2),
   as pycma), adds them to the model and computes the model's Kendall tau against the truth on
   the latest `n_for_tau` points;
3. once tau >= 0.85 (or all of X is evaluated), CMA-ES is told the whole generation: true losses
   where known (all of them when all are known), model values shifted so that the model's best
   equals the best true loss for the others; the model's optimum is injected into the next
   generation (`cma.fmin_lq_surr2`'s default).

Within a round the evaluation order is fixed before the round starts, as in pycma's
`eval_sequence`, so batching changes nothing but how the losses arrive. Only true evaluations are
API calls; a round may ask fewer points than popsize.
"""
from __future__ import annotations

import math

import numpy as np

from raydapt.search.optimizers import CMAOptimizer

__all__ = ["LQCMAOptimizer"]


class LQCMAOptimizer(CMAOptimizer):
    """pycma's CMA-ES with pycma's linear-quadratic surrogate deciding how many of each generation
    the teacher scores. `ask()` returns the next round's points (1..popsize of them)."""

    def __init__(self, dim: int, popsize: int, sigma: float, seed: int,
                 bounds: tuple[float, float] | None = None, budget: int | None = None):
        super().__init__(dim, popsize, sigma, seed, bounds=bounds, budget=budget)
        import cma.fitness_models as fm

        # pycma's defaults, read from its settings class when needed (its n_for_tau is a lambda: an
        # instance holding it would not pickle, and the optimizer state must)
        self._model = fm.LQModel()
        self._model.settings.max_absolute_size = _settings().model_max_size_factor * popsize
        self._X: np.ndarray | None = None        # the generation in progress (P, d)
        self._f: np.ndarray | None = None        # its true losses, nan where not evaluated (P,)
        self._target = 0                         # points to have evaluated after this round
        self._round: np.ndarray | None = None    # indices asked in this round
        self.true_fraction: list[float] = []     # per finished generation: share scored by the teacher
        self.taus: list[float] = []              # per finished generation: the last Kendall tau

    def ask(self) -> np.ndarray:
        if self._X is None:
            self._X = super().ask()
            self._f = np.full(len(self._X), np.nan)
            self._target = int(1 + max(len(self._X) * _settings().min_evals_percent / 100,
                                       3 / self._model.settings.truncation_ratio - self._model.size))
        missing = np.flatnonzero(np.isnan(self._f))
        if self._model.size > 1:  # the model's order, fixed for the round (pycma's eval_sequence)
            order = np.argsort([self._model.eval(x) for x in self._X])
            missing = np.array([i for i in order if np.isnan(self._f[i])], dtype=int)
        need = max(1, self._target - int(np.sum(~np.isnan(self._f))))
        self._round = missing[:need]
        return self._X[self._round].copy()

    def tell(self, solutions: np.ndarray, losses: np.ndarray) -> None:
        asked = None if self._round is None else self._X[self._round]
        if asked is None or np.shape(solutions) != asked.shape or not np.array_equal(solutions, asked):
            raise ValueError("lq-cma: tell the points of the last ask(), in order (no extra solutions)")
        solutions, losses = self._record(solutions, losses)
        for i, f in zip(self._round, losses):
            self._f[i] = f
            self._model.add_data_row(self._X[i], float(f))
        self._round = None
        evaluated = int(np.sum(~np.isnan(self._f)))
        self._model.sort(self._target)
        tau = self._model.kendall(_settings().n_for_tau(len(self._X), evaluated))
        if tau >= _settings().tau_truth_threshold or evaluated == len(self._X):
            self._finish(tau, evaluated)
        else:
            self._target += int(math.ceil(self._target / 2))

    def _finish(self, tau: float, evaluated: int) -> None:
        model = self._model
        model.sort(evaluated)
        model.adapt_max_relative_size(tau)
        if evaluated == len(self._X):
            values = self._f
        else:  # pycma's surrogate_values: the model, shifted so its best is the best true loss
            predicted = np.array([model.eval(x) for x in self._X])
            values = predicted - predicted.min() + np.nanmin(self._f)
        with self._own_rng():
            self._es.tell(list(self._X), [float(v) for v in values])
            self._es.inject([model.xopt])
        self.true_fraction.append(evaluated / len(self._X))
        self.taus.append(float(tau))
        self._X = self._f = None

    def stop(self) -> bool:
        return self._budget_spent() or (self._X is None and super().stop())


def _settings():
    """pycma's SurrogatePopulation defaults (tau threshold 0.85, n_for_tau, min_evals_percent, ...)."""
    import cma.fitness_models as fm
    return fm.SurrogatePopulationSettings
