"""The GDFO student on a tiny Llama: distillation learns, gradients descend, state round-trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from raydapt.bbt.space import PromptSpace
from raydapt.gdfo.student import Student, StudentSettings, distill_loss, spearman

D, L = 6, 3


def make_student(tiny_checkpoints, **settings) -> Student:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"][0], use_safetensors=True).float().eval()
    space = PromptSpace(D, L, 32, 0.02, seed=5)
    return Student(model, space, [3, 4, 5], StudentSettings(seed=2, **settings))


def inputs():
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, 128, (6, 9)))
    return ids, torch.tensor([9, 7, 8, 9, 6, 9]), torch.tensor([0, 1, 2, 0, 1, 2])


def teacher_logits(z: np.ndarray) -> np.ndarray:
    """A teacher whose label logits are a fixed linear function of z: (P, N=6, K=3)."""
    w = np.random.default_rng(1).normal(0, 1, (D, 6 * 3))
    return (z @ w).reshape(len(z), 6, 3).astype(np.float32)


def test_distill_loss_known_values():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    assert float(distill_loss(s, t, None, StudentSettings(temperature=2.0))) == pytest.approx(4 * np.log(2))
    assert float(distill_loss(s, t, None, StudentSettings(temperature=2.0, distill="kl"))) == pytest.approx(0.0)
    hard = distill_loss(s, t, torch.tensor([1]), StudentSettings(temperature=1.0, hard_weight=0.5))
    assert float(hard) == pytest.approx(np.log(2) * 1.5)


def test_spearman():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)
    assert spearman(np.ones(4), np.arange(4.0)) == 0.0


def test_distillation_lowers_the_loss(tiny_checkpoints):
    # KL at T = 1: the soft cross-entropy also holds the teacher's entropy, which no student can lower.
    student = make_student(tiny_checkpoints, lr=3e-3, steps=10, replay=0, distill="kl", temperature=1.0)
    ids, lengths, labels = inputs()
    z = np.random.default_rng(3).normal(0, 1, (8, D)).astype(np.float32)
    student.add(z, teacher_logits(z))
    first = student.train(ids, lengths, labels)
    for _ in range(3):
        last = student.train(ids, lengths, labels)
    assert last < 0.7 * first


def test_gradient_path_descends_the_student_loss(tiny_checkpoints):
    student = make_student(tiny_checkpoints, grad_steps=4, grad_lr=0.05)
    ids, lengths, labels = inputs()
    start = np.zeros(D)
    path = student.descend(start, ids, lengths, labels, sigma=1.0)
    assert path.shape == (4, D)
    before, *_, after = student.task_losses(np.vstack([start, path]), ids, lengths, labels)
    assert after < before


def test_state_round_trip_continues_identically(tiny_checkpoints):
    ids, lengths, labels = inputs()
    z = np.random.default_rng(4).normal(0, 1, (5, D)).astype(np.float32)
    a = make_student(tiny_checkpoints)
    a.add(z, teacher_logits(z))
    a.train(ids, lengths, labels)
    saved = a.state_bytes()
    b = make_student(tiny_checkpoints)
    b.load_state(saved)
    for s in (a, b):
        s.add(z + 1, teacher_logits(z + 1))
    assert a.train(ids, lengths, labels) == b.train(ids, lengths, labels)
    assert np.array_equal(a.descend(z[0], ids, lengths, labels, 1.0), b.descend(z[0], ids, lengths, labels, 1.0))


def test_trust_needs_agreement_beyond_noise_over_a_window():
    from raydapt.gdfo.search import trust_level
    # one generation of P = 20: rho's no-agreement sd is 1/sqrt(19) = 0.229, the bar 0.459
    assert trust_level([0.9], 5, 20, 0.2) == 0.9
    assert trust_level([0.4], 5, 20, 0.2) == 0.0
    # five generations: sd 1/sqrt(95) = 0.103, the bar 0.205
    assert trust_level([0.4] * 5, 5, 20, 0.2) == pytest.approx(0.4)
    assert trust_level([0.9, -0.3, -0.2, 0.1, -0.1], 5, 20, 0.0) == 0.0  # one lucky generation among noise
    assert trust_level([0.4] * 5, 5, 20, 0.5) == 0.0  # --min-trust still applies
    assert trust_level([-1.0] * 10 + [0.5] * 5, 5, 20, 0.2) == pytest.approx(0.5)  # only the window counts
    assert trust_level([], 5, 20, 0.2) == 0.0 and trust_level([None, 0.9], 5, 20, 0.2) == 0.9


def test_teacher_gradient_matches_finite_differences_and_a_student_that_is_the_teacher(tiny_checkpoints):
    from types import SimpleNamespace

    from raydapt.gdfo.diagnosis import TeacherGradient

    ids, lengths, labels = inputs()
    train = SimpleNamespace(input_ids=ids.numpy(), lengths=lengths.numpy(), labels=labels.numpy())
    space = PromptSpace(D, L, 32, 0.02, seed=5)
    teacher = TeacherGradient(tiny_checkpoints["llama"][0], space, [3, 4, 5], train)
    z = np.random.default_rng(4).normal(0, 1, D)
    grad = teacher.gradient(z)
    for u in np.eye(D)[:3]:  # central differences of the loss, in float64 around a float32 model
        eps = 1e-2
        fd = (teacher.loss(z + eps * u) - teacher.loss(z - eps * u)) / (2 * eps)
        assert abs(grad @ u) > 1e-4 and fd == pytest.approx(grad @ u, rel=2e-2)
    # A student with the teacher's model and projection, untrained, descends along the teacher's gradient.
    same = make_student(tiny_checkpoints, grad_steps=2, grad_lr=0.1)
    path = same.descend(z, ids, lengths, labels, sigma=1.0)
    assert teacher.student_cosine(z, path) == pytest.approx(1.0, abs=1e-5)
    assert teacher.student_cosine(z, 2 * z[None] - path) == pytest.approx(-1.0, abs=1e-5)
