"""CombLM combiners: known answers on small synthetic vocabularies (pure PyTorch, no Ray)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydapt.comblm.combiners import (COMBINERS, LEARNED, Combiner, balance_fits, combiner_state, default_lr,
                                      evaluate_nll, fit, load_combiner, make_combiner, max_prob_oracle_nll,
                                      mixed_gold_logprob, mixed_logprobs, needs_full, perplexity,
                                      proxy_tuning_gold_logprob, proxy_tuning_nll, single_nll, token_batch)
from raydapt.errors import UserError

V = 32
HIDDEN = 64  # small network keeps every fit well under a second


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def synth(n: int, *, seed: int, lam: float = 0.3, gold_from: str = "mixture", full_dtype=np.float32) -> dict:
    """Token arrays for two random models over V words; gold drawn from lam*P_S + (1-lam)*P_L, or from the
    lower-entropy model (gold_from="confident"), with per-token temperatures so entropies vary."""
    g = torch.Generator().manual_seed(seed)
    scale = 3.0
    if gold_from == "confident":
        scale = torch.empty(2, n, 1, dtype=torch.float64).uniform_(0.3, 4.0, generator=g)
    logits = torch.randn(2, n, V, generator=g, dtype=torch.float64) * scale
    small, large = torch.log_softmax(logits, dim=-1)
    ent_s, ent_l = _entropy(small), _entropy(large)
    if gold_from == "mixture":
        probs = lam * small.exp() + (1 - lam) * large.exp()
    else:
        probs = torch.where((ent_s < ent_l)[:, None], small.exp(), large.exp())
    gold = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    at = lambda lp: lp.gather(-1, gold[:, None]).squeeze(-1)  # noqa: E731
    f32 = lambda t: t.numpy().astype(np.float32)  # noqa: E731
    return {"gold": gold.numpy().astype(np.int64), "small_gold": f32(at(small)), "large_gold": f32(at(large)),
            "small_entropy": f32(ent_s), "large_entropy": f32(ent_l),
            "small_full": small.numpy().astype(full_dtype), "large_full": large.numpy().astype(full_dtype)}


@pytest.fixture(scope="module")
def mix():
    """(train, test) arrays from the 0.3/0.7 mixture."""
    return synth(4096, seed=1), synth(2048, seed=2)


@pytest.fixture(scope="module")
def batch():
    return token_batch(synth(64, seed=3), slice(None), full=True)


# --- the mixture itself -------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, V])
def test_extreme_logits_select_one_model(batch, width):
    rows = batch["gold"].shape[0]
    big = torch.full((rows, width), 50.0)
    torch.testing.assert_close(mixed_gold_logprob(batch, -big), batch["large_gold"], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed_gold_logprob(batch, big), batch["small_gold"], atol=1e-6, rtol=0)


def test_equal_vector_logits_match_scalar(batch):
    a = torch.randn(batch["gold"].shape[0], 1, generator=torch.Generator().manual_seed(0))
    scalar = mixed_gold_logprob(batch, a)
    vector = mixed_gold_logprob(batch, a.expand(-1, V))
    torch.testing.assert_close(vector, scalar, atol=1e-5, rtol=0)


def test_vector_mixture_sums_to_one(batch):
    rows = batch["gold"].shape[0]
    a = 3 * torch.randn(rows, V, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mixed_logprobs(batch, a).exp().sum(-1), torch.ones(rows), atol=1e-5, rtol=0)
    # The same through the gold path: P(gold = v) summed over every v.
    per_id = [mixed_gold_logprob({**batch, "gold": torch.full((rows,), v)}, a) for v in range(V)]
    torch.testing.assert_close(torch.stack(per_id, -1).exp().sum(-1), torch.ones(rows), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed_gold_logprob(batch, a),
                               mixed_logprobs(batch, a).gather(-1, batch["gold"][:, None]).squeeze(-1))


def test_mean_combiner_is_half_half(batch):
    got = mixed_gold_logprob(batch, Combiner("mean", V)(batch)).double()
    s, l = batch["small_gold"].double(), batch["large_gold"].double()
    torch.testing.assert_close(got, torch.log(0.5 * s.exp() + 0.5 * l.exp()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", LEARNED)
def test_every_combiner_starts_at_the_mean(batch, kind):
    c = make_combiner(kind, V, seed=0, hidden=HIDDEN)
    logits = c(batch)
    assert logits.shape == (batch["gold"].shape[0], V if c.is_vector else 1)
    assert torch.all(logits == 0)
    assert c.is_vector == (kind.endswith("_vector")) and c.kind == kind


def test_float16_full_arrays_are_converted():
    a32, a16 = synth(256, seed=4), synth(256, seed=4, full_dtype=np.float16)
    assert a16["small_full"].dtype == np.float16
    c = Combiner("constant_vector", V)
    assert abs(evaluate_nll(c, a16, batch_tokens=100) - evaluate_nll(c, a32)) < 2e-3


# --- fitting --------------------------------------------------------------------------------------

def test_constant_scalar_recovers_lambda(mix):
    train, test = mix
    c = make_combiner("constant_scalar", V, seed=0)
    fit(c, train, lr=0.05, batch_tokens=256, epochs=4)
    lam = torch.sigmoid(c.logit).item()
    assert abs(lam - 0.3) < 0.05, lam
    assert evaluate_nll(c, test) < evaluate_nll(Combiner("mean", V), test)


def test_entropy_beats_constant_when_the_confident_model_is_right():
    train, test = synth(4096, seed=5, gold_from="confident"), synth(2048, seed=6, gold_from="confident")
    const = make_combiner("constant_scalar", V, seed=0)
    fit(const, train, lr=0.05, batch_tokens=256, epochs=3)
    ent = make_combiner("entropy_scalar", V, seed=0, hidden=HIDDEN)
    fit(ent, train, lr=1e-2, batch_tokens=256, epochs=3)
    assert evaluate_nll(ent, test) < evaluate_nll(const, test) - 0.1


@pytest.mark.parametrize("kind", LEARNED)
def test_every_learned_combiner_beats_both_models(mix, kind):
    train, test = mix
    c = make_combiner(kind, V, seed=0, hidden=HIDDEN)
    losses = fit(c, train, batch_tokens=256, epochs=2)
    assert len(losses) == 2 * 16 and not c.training
    nll = evaluate_nll(c, test)
    assert nll < min(single_nll(test, "small"), single_nll(test, "large"))
    assert nll < evaluate_nll(Combiner("mean", V), test)  # it learned something
    assert perplexity(nll) == pytest.approx(math.exp(nll))


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["entropy_vector", "full_scalar", "constant_vector"])
def test_fit_is_deterministic_and_state_round_trips(mix, kind):
    train, test = mix
    states = []
    for _ in range(2):
        c = make_combiner(kind, V, seed=7, hidden=HIDDEN)
        fit(c, train, batch_tokens=512, seed=3)
        states.append(combiner_state(c))
    assert _states_equal(*states)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in states[0].values())
    if kind.startswith(("entropy_", "full_")):
        assert "net.0.running_mean" in states[0]  # BatchNorm statistics travel with the weights
    other = make_combiner(kind, V, seed=7, hidden=HIDDEN)
    fit(other, train, batch_tokens=512, seed=4)
    assert not _states_equal(states[0], combiner_state(other))

    safetensors = pytest.importorskip("safetensors.torch")
    loaded = load_combiner(kind, V, safetensors.load(safetensors.save(states[0])), hidden=HIDDEN)
    assert not loaded.training
    assert evaluate_nll(loaded, test) == evaluate_nll(c, test)


def test_fit_batches_steps_and_mean():
    arrays = synth(2 * 100 + 1, seed=8)  # last batch of 1 row is dropped (BatchNorm needs 2)
    seen = []
    losses = fit(make_combiner("entropy_scalar", V, seed=0, hidden=HIDDEN), arrays, batch_tokens=100, epochs=3,
                 on_step=lambda step, loss: seen.append((step, loss)))
    assert len(losses) == 6 and seen == list(enumerate(losses, start=1))
    assert len(fit(Combiner("constant_scalar", V), synth(2 * 100 + 2, seed=8), batch_tokens=100)) == 3
    assert fit(Combiner("mean", V), arrays) == [] and combiner_state(Combiner("mean", V)) == {}


def test_load_rejects_a_mismatched_state():
    state = combiner_state(make_combiner("full_vector", V, seed=0, hidden=HIDDEN))
    with pytest.raises(UserError, match="does not fit"):
        load_combiner("full_vector", V + 1, state, hidden=HIDDEN)


# --- baselines ----------------------------------------------------------------------------------

def test_proxy_tuning_known_answers(batch):
    g = torch.Generator().manual_seed(9)
    expert = torch.log_softmax(torch.randn(batch["gold"].shape[0], V, generator=g), -1)
    untuned = torch.log_softmax(torch.randn(batch["gold"].shape[0], V, generator=g), -1)
    large = batch["large_full"]
    at_gold = lambda lp: lp.gather(-1, batch["gold"][:, None]).squeeze(-1)  # noqa: E731
    torch.testing.assert_close(proxy_tuning_gold_logprob(large, expert, untuned, batch["gold"], alpha=0.0),
                               batch["large_gold"], atol=1e-5, rtol=0)
    # The untuned small model equal to the large one: the expert's distribution comes out.
    torch.testing.assert_close(proxy_tuning_gold_logprob(large, expert, large, batch["gold"]), at_gold(expert),
                               atol=1e-5, rtol=0)
    # Batched over numpy (float16 storage) agrees with one call on everything.
    arrays = [t.numpy().astype(np.float16) for t in (large, expert, untuned)]
    direct = -proxy_tuning_gold_logprob(*map(torch.from_numpy, arrays), batch["gold"], alpha=0.5).mean().item()
    batched = proxy_tuning_nll(*arrays, batch["gold"].numpy(), alpha=0.5, batch_tokens=10)
    assert batched == pytest.approx(direct, abs=1e-6)


def test_max_prob_oracle_bounds_both_models(mix):
    _, test = mix
    oracle = max_prob_oracle_nll(test)
    assert oracle <= single_nll(test, "small") and oracle <= single_nll(test, "large")
    assert single_nll(test, "large") == pytest.approx(-np.mean(test["large_gold"], dtype=np.float64))


# --- names and errors ---------------------------------------------------------------------------

def test_names_lrs_and_needs_full():
    assert COMBINERS[0] == "mean" and LEARNED == COMBINERS[1:]
    full = ["constant_vector", "entropy_vector", "full_scalar", "full_vector"]
    assert [k for k in COMBINERS if needs_full(k)] == full
    assert default_lr("constant_vector") == 1e-2 and default_lr("entropy_scalar") == 2e-3


def test_unknown_kind_names_the_accepted_ones():
    with pytest.raises(UserError) as info:
        Combiner("bogus", V)
    message = str(info.value)
    assert "bogus" in message and "\n" not in message
    assert all(k in message for k in COMBINERS)
    with pytest.raises(UserError):
        make_combiner("bogus", V, seed=0)
    with pytest.raises(UserError, match="small, large"):
        single_nll({}, "medium")


def test_vector_combiner_without_full_distributions_is_a_user_error(batch):
    scalar_only = {k: v for k, v in batch.items() if not k.endswith("_full")}
    with pytest.raises(UserError, match="small_full"):
        mixed_gold_logprob(scalar_only, torch.zeros(batch["gold"].shape[0], V))


def test_fits_are_balanced_longest_first():
    kinds = ["mean", "constant_scalar", "constant_vector", "entropy_scalar", "entropy_vector", "full_scalar",
             "full_vector"]
    # Longest first, to the less loaded: full_vector (54) -> 0, entropy_vector (39) -> 1, constant_vector
    # (32) -> 1 (39 < 54), full_scalar (31) -> 0 (54 < 71), then the cheap ones -> 1 (71 < 85).
    assert balance_fits(kinds, 2) == [1, 1, 1, 1, 1, 0, 0]
    assert balance_fits(kinds, 1) == [0] * 7
    assert sorted(set(balance_fits(kinds, 3))) == [0, 1, 2]
    assert balance_fits(kinds, 2) == balance_fits(kinds, 2)  # every worker computes the same assignment
