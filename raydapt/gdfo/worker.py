"""The GDFO student's worker: it learns from the teacher's answers and hands back gradient-refined
points, while the teacher (the oracle's stage actors) scores the next population.

A plain class. `GDFOSearch` reaches it through a handle whose `submit(method, *args)` returns a
future: `InlineStudent` here runs it in this process (`--local`); `actors.student.RayStudent` runs
it as a Ray actor, so that it computes beside the teacher.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future

import numpy as np
import torch

from raydapt.bbt.space import PromptSpace
from raydapt.errors import UserError
from raydapt.gdfo.student import Student, StudentSettings

__all__ = ["StudentWorker", "InlineStudent"]


class StudentWorker:
    def __init__(self, student_dir: str, settings: StudentSettings, label_ids: list[int], train: tuple,
                 intrinsic_dim: int, prompt_length: int, alpha: float, sigma: float, projection: str,
                 threads: int = 1):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)  # fixed, so results do not depend on where the actor lands
        torch.manual_seed(settings.seed)
        try:
            model = AutoModelForCausalLM.from_pretrained(student_dir, use_safetensors=True).float().eval()
        except OSError as e:
            raise UserError(f"--student {student_dir}: not a loadable checkpoint ({str(e).splitlines()[0]})")
        std = float(model.get_input_embeddings().weight.detach().std())
        space = PromptSpace(intrinsic_dim, prompt_length, model.config.hidden_size, std, settings.seed,
                            distribution=projection, alpha=alpha, sigma=sigma)
        self.student = Student(model, space, label_ids, settings)
        # Copies: Ray hands the actor read-only views of its object store, which torch warns about.
        self.ids, self.lengths, self.labels = (torch.tensor(a) for a in train)
        self.sigma = sigma

    def generation(self, predict: np.ndarray, learn: tuple | None, start: np.ndarray | None) -> dict:
        """One generation's fixed work, in this order:
        1. learn from the teacher's answers to the previous generation (z (P,d), logits (P,N,K));
        2. predict the task loss of this generation's points (not yet learned from: an honest
           forecast, compared with the teacher's losses to decide how far to trust the student);
        3. descend from `start`, giving the gradient points for the next generation."""
        began = time.perf_counter()
        train_loss = None
        if learn is not None:
            self.student.add(*learn)
            train_loss = self.student.train(self.ids, self.lengths, self.labels)
        predicted = self.student.task_losses(predict, self.ids, self.lengths, self.labels)
        path = None
        if start is not None:
            path = self.student.descend(start, self.ids, self.lengths, self.labels, self.sigma)
        return {"predicted": predicted, "path": path, "train_loss": train_loss,
                "compute_s": time.perf_counter() - began, "state": self.student.state_bytes()}

    def load_state(self, data: bytes) -> bool:
        self.student.load_state(data)
        return True

    def save(self, path: str) -> None:
        """The distilled student as a safetensors checkpoint directory."""
        self.student.model.save_pretrained(path, safe_serialization=True)

    def tensor_shapes(self) -> dict:
        """What this process holds: its pid and the shape of every student tensor (for audits)."""
        return {"pid": os.getpid(),
                "shapes": sorted({tuple(p.shape) for p in self.student.model.state_dict().values()})}


class InlineStudent:
    """A `StudentWorker` in this process, behind an actor handle's interface: each call runs at once
    and returns a finished future."""

    def __init__(self, *worker_args):
        self._worker = StudentWorker(*worker_args)

    def submit(self, method: str, *args) -> Future:
        done = Future()
        done.set_result(getattr(self._worker, method)(*args))
        return done
