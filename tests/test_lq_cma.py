"""lq-CMA-ES (raydapt.search.lq_cma): pycma's surrogate-assisted CMA-ES with batched true evaluations."""
import numpy as np
import pytest

from raydapt.search import CMAOptimizer, make_optimizer, pycma_seed, restore


def ellipsoid(x):
    x = np.asarray(x)
    return float(np.sum(np.arange(1, x.shape[-1] + 1) * x ** 2))


def test_same_points_as_pycmas_surrogate_population():
    # pycma's own loop (SurrogatePopulation calls the fitness point by point, the model's optimum is
    # injected, as cma.fmin_lq_surr2 does) is the independent answer: the batched rounds must ask
    # the teacher for exactly the same points in the same order
    import cma
    import cma.fitness_models as fm
    seen = []

    def fitness(x):
        seen.append(np.array(x, float))
        return ellipsoid(x)

    es = cma.CMAEvolutionStrategy(6 * [0.0], 1.0, {"seed": pycma_seed(5), "popsize": 8, "verbose": -9,
                                                    "bounds": [None, None]})
    surrogate = fm.SurrogatePopulation(fitness)
    surrogate.settings.logging_push = False
    for _ in range(15):
        X = es.ask()
        es.tell(X, surrogate(X))
        es.inject([surrogate.model.xopt])
    opt = make_optimizer("lq-cma", 6, 8, budget=10_000, seed=5, sigma=1.0)
    mine, rounds = [], 0
    while len(mine) < len(seen):
        X = opt.ask()
        assert 1 <= len(X) <= 8
        mine += list(X)
        opt.tell(X, np.array([ellipsoid(x) for x in X]))
        rounds += 1
    assert len(mine) == len(seen) and rounds < len(seen)  # batched: fewer requests than points
    assert all(np.array_equal(a, b) for a, b in zip(seen, mine))


def test_saves_calls_on_a_smooth_function():
    # Hansen (2019): 2-6x fewer evaluations on smooth functions; here, at equal calls, lq-CMA-ES is
    # orders of magnitude closer to the optimum of an 8-d ellipsoid than plain CMA-ES
    def run(opt, calls):
        while opt.evaluations < calls:
            X = opt.ask()
            opt.tell(X, np.array([ellipsoid(x) for x in X]))
        return opt.best()[1]

    lq = make_optimizer("lq-cma", 8, 10, budget=200, seed=3, sigma=1.0)
    assert run(lq, 150) < 1e-6
    assert run(CMAOptimizer(8, 10, 1.0, seed=3), lq.evaluations) > 1e-2
    assert np.mean(lq.true_fraction) < 0.5  # most candidates were ranked by the model alone


def test_refuses_points_it_did_not_ask():
    opt = make_optimizer("lq-cma", 4, 6, budget=100, seed=1, sigma=1.0)
    X = opt.ask()
    with pytest.raises(ValueError, match="no extra solutions"):
        opt.tell(np.vstack([X, np.zeros((1, 4))]), np.zeros(len(X) + 1))
    opt.tell(X, np.ones(len(X)))
    assert restore(opt.state_bytes()).evaluations == len(X)


@pytest.mark.parametrize("name", ["cma", "lq-cma"])
def test_bound_boxes_the_search(name):
    opt = make_optimizer(name, 5, 8, budget=100, seed=1, sigma=3.0, bound=0.5)
    for _ in range(3):
        X = opt.ask()
        assert np.abs(X).max() <= 0.5
        opt.tell(X, np.array([ellipsoid(x - 1.0) for x in X]))
