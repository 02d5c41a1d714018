"""How well the student's gradient points where the teacher's does, measured beside a GDFO run
(`--diagnose-gradient`, issue 17).

The teacher's true gradient of the task loss at the student's start point z0 is computed in the
coordinator from the teacher's own checkpoint (a local white box: raydapt's default LM, or any
checkpoint directory), through the job's own projection A_T. It goes to the log and result.json
and never into the search: a run with the diagnosis asks and tells exactly what it would without.
The student's gradient direction needs no extra call: its path's first point is z0 minus a
normalised gradient step (`descent_direction`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raydapt.gdfo.student import Student, StudentSettings, descent_direction

__all__ = ["TeacherGradient", "cosine", "task_gradient", "task_loss"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def task_gradient(model: Student, z: np.ndarray, split) -> tuple[np.ndarray, float]:
    """(d(task loss)/dz (d,), task loss) of `model` (a Student wrapper) on `split` at z (d,)."""
    zt = torch.tensor(np.asarray(z, np.float32), requires_grad=True)
    ids, lens, labels = (torch.as_tensor(a) for a in (split.input_ids, split.lengths, split.labels))
    loss = F.cross_entropy(model.label_logits(zt[None], ids, lens)[0], labels)
    (grad,) = torch.autograd.grad(loss, zt)
    return grad.numpy().astype(np.float64), loss.item()


def task_loss(model: Student, z: np.ndarray, split) -> float:
    ids, lens, labels = (torch.as_tensor(a) for a in (split.input_ids, split.lengths, split.labels))
    return float(model.task_losses(np.asarray(z)[None], ids, lens, labels)[0])


class TeacherGradient:
    def __init__(self, model_dir: str, space, label_ids: list[int], train):
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng():  # the wrapper seeds torch; the coordinator's stream must not move
            model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).float().eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.teacher = Student(model, space, label_ids, StudentSettings())
        self.train = train

    def loss(self, z: np.ndarray) -> float:
        """The teacher's task loss at z (the oracle's loss there, from the white box)."""
        return task_loss(self.teacher, z, self.train)

    def gradient(self, z: np.ndarray) -> np.ndarray:
        """d(task loss)/dz at z, (d,)."""
        return task_gradient(self.teacher, z, self.train)[0]

    def student_cosine(self, start: np.ndarray, path: np.ndarray) -> float:
        """cos(student's gradient, teacher's gradient) at `start`, from the student's descent path."""
        return cosine(descent_direction(start, path), self.gradient(start))
