"""BBT building blocks: projection scale and determinism, clipped std, losses, optimizers and resume."""
from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from raydapt.bbt import LOSSES, METRICS, DeepPromptSpace, PromptSpace, accuracy, clipped_std, cross_entropy, hinge, macro_f1
from raydapt.errors import UserError
from raydapt.search import CMAOptimizer, NevergradOptimizer, Optimizer, make_optimizer, pycma_seed, restore

# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_projection_has_embedding_scale(distribution):
    d, sigma, emb_std = 100, 0.7, 0.05
    space = PromptSpace(d, 8, 64, emb_std, seed=3, distribution=distribution, sigma=sigma)
    assert space.A.shape == (8 * 64, d) and space.A.dtype == torch.float32
    assert float(space.A.std()) == pytest.approx(emb_std / (math.sqrt(d) * sigma), rel=0.02)
    z = np.random.default_rng(0).normal(0.0, sigma, size=(64, d))
    prompts = space.project(z)
    assert prompts.shape == (64, 8, 64) and prompts.dtype == np.float32
    assert prompts.std() == pytest.approx(emb_std, rel=0.03)
    if distribution == "uniform":
        u = math.sqrt(3.0) * space.scale
        assert float(space.A.abs().max()) <= u and float(space.A.abs().max()) > 0.99 * u


def test_projection_is_deterministic_and_matches_torch():
    a, b, c = (PromptSpace(20, 4, 16, 0.1, seed=s) for s in (7, 7, 8))
    assert a.A.numpy().tobytes() == b.A.numpy().tobytes()
    assert not torch.equal(a.A, c.A)
    z = np.random.default_rng(1).normal(size=(5, 20))
    assert a.project(z).tobytes() == b.project(z).tobytes()
    assert a.project(z[2]).shape == (4, 16)
    zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    out = a.project_torch(zt)
    assert torch.equal(out.detach(), torch.from_numpy(a.project(z)))
    out.sum().backward()  # d(sum A z)/dz = column sums of A
    assert torch.allclose(zt.grad[0], a.A.sum(0), atol=1e-5)


def test_deep_space_layers_and_population():
    space = DeepPromptSpace(6, 3, 4, layer_stds=[1.0, 2.0, 0.5], seed=11)
    assert space.n_layers == 3
    assert not torch.equal(space.layers[0].A / 1.0, space.layers[1].A / 2.0)  # layers draw different A
    assert [s.scale for s in space.layers] == pytest.approx([1 / math.sqrt(6), 2 / math.sqrt(6), 0.5 / math.sqrt(6)])
    again = DeepPromptSpace(6, 3, 4, layer_stds=[1.0, 2.0], seed=11)  # seeds do not depend on the layer count
    assert torch.equal(space.layers[1].A, again.layers[1].A)
    rng = np.random.default_rng(2)
    fixed, cands = rng.normal(size=(3, 6)), rng.normal(size=(5, 6))
    deep = space.assemble(fixed)
    assert deep.shape == (3, 3, 4) and np.array_equal(deep[2], space.project(2, fixed[2]))
    pop = space.population(1, cands, fixed)
    assert pop.shape == (5, 3, 3, 4)
    assert np.array_equal(pop[:, 1], space.project(1, cands))
    assert all(np.array_equal(pop[p, l], deep[l]) for p in range(5) for l in (0, 2))


def _deepbbt_clipped_std(hidden):
    """The reference deepbbt.py's loop, transcribed: five rounds of np.clip at mean +- 3 std."""
    mu_hat, std_hat = np.mean(hidden), np.std(hidden)
    for _ in range(5):
        hidden = np.clip(hidden, mu_hat - 3 * std_hat, mu_hat + 3 * std_hat)
        mu_hat, std_hat = np.mean(hidden), np.std(hidden)
    return std_hat


def test_clipped_std_winsorises_as_the_reference():
    values = np.concatenate([np.tile([-1.0, 1.0], 500), [1e6, -3e5]])
    assert np.std(values) > 1e4
    assert clipped_std(values) == pytest.approx(_deepbbt_clipped_std(values), rel=1e-12)
    assert 1.0 < clipped_std(values) < 2.0  # clipped to the bound, not dropped: a little above the bulk's 1.0
    assert clipped_std(np.tile([-2.0, 2.0], 10)) == 2.0  # nothing to clip
    heavy = np.random.default_rng(0).standard_t(2, 20000)
    assert clipped_std(heavy) == pytest.approx(_deepbbt_clipped_std(heavy), rel=1e-12)
    assert clipped_std(heavy, rounds=1) > clipped_std(heavy, rounds=5)


def test_bbtv2_layer0_takes_the_word_embedding_std():
    # BBTv2's layer 0 is scaled as BBT's prompt (the embedding matrix's std), layers l > 0 by the
    # clipped std of the hidden states entering block l (the reference deepbbt.py)
    from types import SimpleNamespace
    from raydapt.bbt.job import build_space
    oracle = SimpleNamespace(info=SimpleNamespace(hidden_dim=4, embed_dim=4),
                             statistics=lambda ids, lengths: {"embedding_std": 2.0, "hidden_std": [9.0, 3.0, 5.0]})
    data = SimpleNamespace(train=SimpleNamespace(input_ids=None, lengths=None))
    cfg = SimpleNamespace(method="bbtv2", intrinsic_dim=3, prompt_length=2, seed=1, projection="normal", alpha=1.0,
                          sigma=1.0)
    space = build_space(cfg, oracle, data)
    assert [layer.embedding_std for layer in space.layers] == [2.0, 3.0, 5.0]


@pytest.mark.parametrize("kwargs, field", [
    (dict(intrinsic_dim=0), "--intrinsic-dim"), (dict(prompt_length=0), "--prompt-length"),
    (dict(embedding_std=0.0), "--embedding-std"), (dict(distribution="cauchy"), "--distribution"),
    (dict(sigma=-1.0), "--sigma"), (dict(seed=-1), "--seed"),
])
def test_space_rejects_bad_input(kwargs, field):
    args = dict(intrinsic_dim=4, prompt_length=2, width=3, embedding_std=1.0, seed=0) | kwargs
    with pytest.raises(UserError, match=field):
        PromptSpace(**args)


# ---------------------------------------------------------------- losses

LOGITS = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
                   [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0]]])  # (P=2, N=4, K=3)
LABELS = np.array([0, 1, 1, 0])


def test_cross_entropy_by_hand():
    lse = lambda *s: math.log(sum(math.exp(v) for v in s))
    p0 = [lse(2, 0, 0) - 2, lse(0, 1, 0) - 1, lse(1, 1, 0) - 1, lse(0, 0, 3) - 0]
    p1 = [math.log(3), lse(5, 0, 0) - 0, lse(0, 2, 0) - 2, lse(0, 3, 0) - 0]
    assert cross_entropy(LOGITS, LABELS) == pytest.approx([np.mean(p0), np.mean(p1)], abs=1e-12)
    assert cross_entropy(LOGITS[1], LABELS) == pytest.approx(np.mean(p1))
    assert cross_entropy(np.array([[1000.0, 0.0]]), np.array([1])) == pytest.approx(1000.0)  # stable


def test_hinge_by_hand():
    # prompt 0: ex0 margin 2 - (2-0) = 0 twice -> 0; ex1 (2-1)+(2-1) = 2; ex2 (2-0)+(2-1) = 3; ex3 2+(2+3) = 7
    # prompt 1: ex0 2+2 = 4; ex1 (2+5)+(2-0) = 9; ex2 0+0 = 0; ex3 (2+3)+2 = 7
    assert hinge(LOGITS, LABELS) == pytest.approx([12 / 4, 20 / 4])
    assert hinge(LOGITS, LABELS, margin=0.0) == pytest.approx([(0 + 0 + 0 + 3) / 4, (0 + 5 + 0 + 3) / 4])


def test_accuracy_and_macro_f1_by_hand():
    # predictions: prompt 0 -> [0, 1, 0 (tie), 2]; prompt 1 -> [0 (tie), 0, 1, 1]; labels [0, 1, 1, 0]
    assert accuracy(LOGITS, LABELS) == pytest.approx([0.5, 0.5])
    # prompt 0: class 0 tp1 fp1 fn1 -> 1/2; class 1 tp1 fn1 -> 2/3; class 2 fp1 -> 0 => mean 7/18
    # prompt 1: class 0 tp1 fp1 fn1 -> 1/2; class 1 tp1 fp1 fn1 -> 1/2; class 2 absent, not predicted => 1/2
    assert macro_f1(LOGITS, LABELS) == pytest.approx([7 / 18, 0.5])
    assert macro_f1(LOGITS[0], LABELS) == pytest.approx(7 / 18)
    assert set(LOSSES) == {"ce", "hinge"} and set(METRICS) == {"accuracy", "f1"}
    with pytest.raises(ValueError):
        accuracy(LOGITS, np.array([0, 1, 3, 0]))


# ---------------------------------------------------------------- optimizers

CENTRE = np.linspace(-1.0, 1.0, 10) + 1.0


def sphere(X):
    return ((np.asarray(X) - CENTRE) ** 2).sum(-1)


@pytest.mark.parametrize("name", ["cma", "CMA", "TwoPointsDE", "OnePlusOne"])
def test_optimizer_minimises_sphere(name):
    opt = make_optimizer(name, dim=10, popsize=10, budget=600, seed=0, sigma=1.0)
    assert isinstance(opt, Optimizer) and (opt.popsize, opt.dim) == (10, 10)
    while not opt.stop():
        X = opt.ask()
        assert X.shape == (10, 10)
        opt.tell(X, sphere(X))
    x, loss = opt.best()
    assert loss == pytest.approx(sphere(x)) and loss < sphere(np.zeros(10)) / 10
    assert opt.evaluations == 600


def _trajectory(opt, generations):
    asks = []
    for _ in range(generations):
        X = opt.ask()
        asks.append(X)
        opt.tell(X, sphere(X))
    return asks


@pytest.mark.parametrize("name", ["cma", "lq-cma", "CMA", "TwoPointsDE", "OnePlusOne"])
def test_resume_equals_uninterrupted(name):
    full = _trajectory(make_optimizer(name, 10, 6, 1000, 5, 0.5), 10)
    opt = make_optimizer(name, 10, 6, 1000, 5, 0.5)
    np.random.seed(123)  # the caller's global RNG must not matter...
    first = _trajectory(opt, 5)
    data = opt.state_bytes()
    np.random.seed(999)
    np.random.rand(17)
    resumed = restore(data)
    rest = _trajectory(resumed, 5)
    assert all(np.array_equal(a, b) for a, b in zip(full, first + rest))
    assert resumed.best()[1] == min(sphere(X).min() for X in full)
    # ...and the optimizer must not consume it
    np.random.seed(123)
    _trajectory(make_optimizer(name, 10, 6, 1000, 5, 0.5), 3)
    assert np.array_equal(np.random.get_state()[1], np.random.RandomState(123).get_state()[1])


@pytest.mark.parametrize("name", ["cma", "CMA"])
def test_resume_in_fresh_process(tmp_path, name):
    opt = make_optimizer(name, 10, 6, 1000, 0, 0.5)
    _trajectory(opt, 3)
    (tmp_path / "state.pkl").write_bytes(opt.state_bytes())
    expected = _trajectory(opt, 2)
    script = ("import sys, numpy as np\nfrom raydapt.search import restore\n"
              "np.random.seed(42)\n"
              f"opt = restore(open({str(tmp_path / 'state.pkl')!r}, 'rb').read())\n"
              "for _ in range(2):\n"
              "    X = opt.ask(); sys.stdout.buffer.write(X.tobytes())\n"
              f"    opt.tell(X, ((X - np.linspace(-1.0, 1.0, 10) - 1.0) ** 2).sum(-1))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout
    assert out == b"".join(X.tobytes() for X in expected)


@pytest.mark.parametrize("copier", [lambda o: pickle.loads(pickle.dumps(o)), copy.deepcopy])
def test_any_pickling_resumes_exactly(copier):
    # Ray ships objects with cloudpickle: plain pickling must not copy numpy's global RandomState
    full = _trajectory(CMAOptimizer(10, 6, 0.5, seed=2), 6)
    opt = CMAOptimizer(10, 6, 0.5, seed=2)
    first = _trajectory(opt, 3)
    rest = _trajectory(copier(opt), 3)
    assert all(np.array_equal(a, b) for a, b in zip(full, first + rest))


def test_cma_seed_and_extra_solutions():
    assert pycma_seed(0) == 1 and pycma_seed(2**32 - 2) == 2**32 - 1 and pycma_seed(2**32 - 1) == 1
    a, b = CMAOptimizer(5, 4, 1.0, seed=0), CMAOptimizer(5, 4, 1.0, seed=0)
    assert np.array_equal(a.ask(), b.ask()) and not np.array_equal(a.ask(), CMAOptimizer(5, 4, 1.0, 1).ask())
    X = a.ask()
    extra = np.vstack([X, np.full((2, 5), 0.25)])  # GDFO injects gradient-refined points
    losses = np.arange(6.0)[::-1]
    a.tell(extra, losses)
    assert a.evaluations == 6 and np.array_equal(a.best()[0], np.full(5, 0.25)) and a.best()[1] == 0.0
    assert a.ask().shape == (4, 5)
    mean = a.mean()  # GDFO's --grad-start mean: a copy of the search distribution's centre
    assert mean.shape == (5,) and not np.array_equal(mean, np.zeros(5))
    mean[:] = 7.0
    assert not np.array_equal(a.mean(), mean)
    bounded = CMAOptimizer(5, 8, 3.0, seed=1, bounds=(-0.5, 0.5))
    assert np.abs(bounded.ask()).max() <= 0.5


def test_nevergrad_tell_matches_by_value():
    opt = NevergradOptimizer("TwoPointsDE", 4, 5, budget=100, seed=0)
    X = opt.ask()
    opt.tell(X[::-1], sphere_small := ((X[::-1] - 1.0) ** 2).sum(-1))  # order free
    assert opt.evaluations == 5 and opt.best()[1] == sphere_small.min()
    assert opt._asked == []


@pytest.mark.parametrize("kwargs, field", [
    (dict(popsize=1), "--popsize"), (dict(dim=0), "--intrinsic-dim"), (dict(sigma=0.0), "--sigma"),
    (dict(budget=0), "--budget"), (dict(name="NoSuchOptimizer"), "--optimizer 'NoSuchOptimizer' is not a nevergrad"),
    (dict(bound=-1.0), "--bound"), (dict(name="TwoPointsDE", bound=5.0), "--bound: needs --optimizer cma or lq-cma"),
])
def test_make_optimizer_rejects_bad_input(kwargs, field):
    args = dict(name="cma", dim=4, popsize=4, budget=100, seed=0, sigma=1.0) | kwargs
    with pytest.raises(UserError, match=field):
        make_optimizer(**args)


def test_restore_rejects_foreign_pickle():
    with pytest.raises(ValueError, match="not an optimizer"):
        restore(pickle.dumps({"a": 1}))


def test_confusion_matrix_and_class_report_known_answers(capsys):
    from raydapt.bbt.inputs import EncodedTask, Split
    from raydapt.bbt.job import class_report
    from raydapt.bbt.losses import confusion_matrix
    labels = np.array([0, 1, 2, 1])
    logits = np.array([[1, 0, 0], [0, 1, 0], [2, 0, 0], [3, 0, 1.0]])  # predicts 0, 1, 0, 0
    assert confusion_matrix(logits, labels).tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 0]]
    split = Split(np.zeros((4, 3), np.int64), np.ones(4, np.int64), labels)
    data = EncodedTask(split, split, split, split, [5, 6, 7], 0, (" a", " b", " c"), ("neg", "pos", "mid"))
    report = class_report(logits, data)
    assert report["labels"][1] == {"class": 1, "name": "pos", "word": " b", "token_id": 6}
    assert report["per_class_accuracy"] == {"0": 1.0, "1": 0.5, "2": 0.0} and report["warnings"] == []
    one_class = class_report(np.array([[1, 0, 0.0]] * 4), data)
    assert one_class["warnings"] == ["the prompt predicts class 0 ('neg') for all 4 test inputs; "
                                     "its test accuracy is that class's share"]
    assert "warning: the prompt predicts class 0" in capsys.readouterr().err
