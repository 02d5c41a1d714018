"""First-order MAML over tasks for TARP and TAMS (Hou, Salazar, Polovets, TACL 2022, sec. 3.3; Finn et
al. 2017; first-order as in Nichol et al. 2018's FOMAML), written once for the Ray Train workers.

For a task (a domain's train and test sequences):  theta' = theta after `inner_steps` Adam steps on
the train split, moving only the fast parameters (TARP and the TAMS cells); the outer gradient is the
gradient of the test-split loss at theta' with respect to every outer parameter (backbone, TARP's
initialisation, the TAMS supernet and controller), taken as the gradient at theta (first order).

Spreading a meta-batch over workers: every worker fills the rows of a (meta_batch, P) buffer for the
tasks it owns (positions rank::world) and leaves the others at 0.0; one all-reduce (a sum) then gives
every worker the same buffer, since x + 0.0 == x exactly, and the mean over rows is taken in one fixed
order. The outer step is therefore bit-identical whatever the number of workers (given the same torch
thread count per task, which fixes each task's own float sums).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raydapt.adapters.tams import set_task, task_embedding

__all__ = ["Task", "fast_parameters", "outer_parameters", "task_plan", "task_rows", "lm_loss", "task_gradient",
           "meta_gradient_rows", "apply_outer", "outer_optimizer", "has_tams"]


@dataclass
class Task:
    """One domain: train (n, T) and test (m, T) token ids."""
    name: str
    train: torch.Tensor
    test: torch.Tensor


def _named(model, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for name, p in model.named_parameters():
        kind = "fast" if (".tarp." in name or "tams_cell." in name) else \
            "controller" if name.startswith("tams_controller.") else "base"
        if kind == which:
            out.append((name, p))
    return out


def fast_parameters(model) -> list[torch.nn.Parameter]:
    """What the inner loop (and the meta-test adaptation) moves: TARP and the TAMS cells."""
    return [p for _, p in _named(model, "fast")]


def outer_parameters(model, base: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything the outer loop updates: fast, controller, and the backbone if `base`."""
    return _named(model, "fast") + _named(model, "controller") + (_named(model, "base") if base else [])


def has_tams(model) -> bool:
    return any(n.startswith("tams_controller.") for n, _ in model.named_parameters())


def outer_optimizer(model, outer_lr: float, base_lr: float) -> torch.optim.Adam:
    groups = [{"params": [p for _, p in _named(model, "fast") + _named(model, "controller")], "lr": outer_lr}]
    if base_lr > 0:
        groups.append({"params": [p for _, p in _named(model, "base")], "lr": base_lr})
    return torch.optim.Adam(groups, betas=(0.9, 0.99))


def task_plan(seed: int, step: int, n_tasks: int, meta_batch: int) -> np.ndarray:
    """The meta-batch of step `step`: task indices, a function of (seed, step) only."""
    rng = np.random.default_rng([seed, step, 7])
    return rng.choice(n_tasks, meta_batch, replace=meta_batch > n_tasks)


def task_rows(seed: int, step: int, position: int, n_train: int, n_test: int, inner_steps: int,
              batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner rows (inner_steps, batch) of the train split, outer rows (batch,) of the test split)."""
    rng = np.random.default_rng([seed, step, position, 11])
    return rng.integers(0, n_train, (inner_steps, batch)), rng.integers(0, n_test, batch)


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of token ids x (b, T)."""
    return model(input_ids=x, labels=x).loss


def task_gradient(model, outer: list[torch.nn.Parameter], task: Task, inner: np.ndarray, rows: np.ndarray,
                  inner_lr: float, mode: str = "maml") -> tuple[torch.Tensor, float]:
    """(flat outer gradient (P,), outer loss) of one task; the model's parameters are left as found.

    mode "maml": the inner loop adapts the fast parameters on train[inner[s]], s = 0..S-1, then the
    loss is test[rows]'s. mode "multitask" (the control): no inner loop, one loss on the same tokens
    pooled (train[inner] and test[rows]).
    """
    fast = fast_parameters(model)
    saved = [p.detach().clone() for p in fast]
    tams = has_tams(model)
    if tams:
        embedding = task_embedding(model, task.train)
        with torch.no_grad():
            set_task(model, embedding)  # the inner loop does not train the controller
    if mode == "maml":
        opt = torch.optim.Adam(fast, lr=inner_lr)
        for step_rows in inner:
            grads = torch.autograd.grad(lm_loss(model, task.train[torch.from_numpy(step_rows)]), fast)
            for p, g in zip(fast, grads):
                p.grad = g
            opt.step()
        x = task.test[torch.from_numpy(rows)]
    else:
        x = torch.cat([task.train[torch.from_numpy(inner.reshape(-1))], task.test[torch.from_numpy(rows)]])
    if tams:
        set_task(model, embedding)  # the straight-through weights: the outer loss reaches the controller
    loss = lm_loss(model, x)
    grads = torch.autograd.grad(loss, outer, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(outer, grads)])
    with torch.no_grad():
        for p, value in zip(fast, saved):
            p.copy_(value)
    return flat, float(loss.detach())


def meta_gradient_rows(model, outer, tasks: list[Task], seed: int, step: int, positions, meta_batch: int,
                       inner_steps: int, batch: int, inner_lr: float, mode: str) -> torch.Tensor:
    """The (meta_batch, P + 1) buffer with this worker's rows filled (gradient, then the outer loss)."""
    plan = task_plan(seed, step, len(tasks), meta_batch)
    size = sum(p.numel() for p in outer)
    buffer = torch.zeros(meta_batch, size + 1)
    for position in positions:
        task = tasks[plan[position]]
        inner, rows = task_rows(seed, step, position, len(task.train), len(task.test), inner_steps, batch)
        grad, loss = task_gradient(model, outer, task, inner, rows, inner_lr, mode)
        buffer[position, :size] = grad
        buffer[position, size] = loss
    return buffer


def apply_outer(outer: list[torch.nn.Parameter], opt: torch.optim.Optimizer, buffer: torch.Tensor) -> float:
    """One outer Adam step with the mean of the buffer's rows (clipped to norm 1); the mean outer loss."""
    mean = buffer.mean(0)
    grad, loss = mean[:-1], float(mean[-1])
    offset = 0
    for p in outer:
        p.grad = grad[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    torch.nn.utils.clip_grad_norm_(outer, 1.0)
    opt.step()
    return loss
