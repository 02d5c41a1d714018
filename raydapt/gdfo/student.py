"""The white-box student of GDFO (Han et al., Findings of ACL 2023): a small LM that receives the
same searched z as the black-box teacher, learns to mimic the teacher's label-word distributions,
and supplies gradients of the task loss with respect to z.

Pure PyTorch, no Ray: `raydapt.gdfo.worker.StudentWorker` runs it, in this process or (from
`actors.student`) in its own actor.

Shapes: z (P, d); inputs (N, T) with lengths (N,); label logits (P, N, K).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raydapt.bbt.space import PromptSpace
from raydapt.models.prompts import add_at_slots

__all__ = ["StudentSettings", "Student", "descent_direction", "distill_loss", "spearman"]


@dataclass(frozen=True)
class StudentSettings:
    temperature: float = 4.0        # T of the soft cross-entropy (Hinton et al.)
    distill: str = "soft_ce"        # soft_ce: -sum p_T log p_S at temperature T, times T^2; or kl
    hard_weight: float = 0.0        # weight of the gold-label cross-entropy added to the distillation loss
    lr: float = 1e-3                # Adam, student weights (and the map, when learned)
    steps: int = 4                  # Adam steps per generation (fixed work: deterministic)
    replay: int = 64                # rows drawn from older generations per step, besides the newest
    train_map: bool = False         # learn the student's projection A_S too (else fixed, seeded)
    grad_steps: int = 5             # gradient steps on z per generation
    grad_lr: float = 0.5            # step length of normalised gradient steps, in units of the search sigma
    seed: int = 1


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                 settings: StudentSettings) -> torch.Tensor:
    """Mean over rows of T^2 * soft-CE (or KL) between teacher and student at temperature T,
    plus `hard_weight` * CE on gold labels. student/teacher logits (R, K); labels (R,)."""
    t = settings.temperature
    teacher = F.softmax(teacher_logits / t, dim=-1)
    log_student = F.log_softmax(student_logits / t, dim=-1)
    if settings.distill == "kl":
        loss = F.kl_div(log_student, teacher, reduction="batchmean")
    else:
        loss = -(teacher * log_student).sum(-1).mean()
    loss = loss * t * t
    if settings.hard_weight and labels is not None:
        loss = loss + settings.hard_weight * F.cross_entropy(student_logits, labels)
    return loss


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """scipy's Spearman rank correlation (average ranks for ties); 0 rather than nan when either
    side is constant, so a flat forecast reads as no agreement."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def descent_direction(start: np.ndarray, path: np.ndarray) -> np.ndarray:
    """The student's negative gradient direction at `start`, read off its descent path (d,): the
    path's first point is `start` minus one normalised gradient step, so no extra backward pass."""
    return np.asarray(start, np.float64) - path[0]


class Student:
    """A small causal LM with BBT's add-mode prompt: student prompt = A_S z added at the slots."""

    def __init__(self, model, space: PromptSpace, label_ids: list[int], settings: StudentSettings):
        torch.manual_seed(settings.seed)
        self.model, self.space, self.settings = model, space, settings
        self.label_ids = list(label_ids)
        self.A = torch.nn.Parameter(space.A.clone(), requires_grad=settings.train_map)  # (L*D_S, d)
        params = list(model.parameters()) + ([self.A] if settings.train_map else [])
        self.opt = torch.optim.Adam(params, lr=settings.lr)
        self.rng = np.random.default_rng(settings.seed)
        self.buffer_z: list[np.ndarray] = []       # per generation (P, d)
        self.buffer_logits: list[np.ndarray] = []  # per generation (P, N, K)

    # --- forward -----------------------------------------------------------------------------
    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        """z (P, d) -> (P, L, D_S)."""
        length = self.space.prompt_length
        return (z.to(self.A.dtype) @ self.A.T).reshape(len(z), length, -1)

    def label_logits(self, z: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor,
                     pairs: torch.Tensor | None = None) -> torch.Tensor:
        """Label logits of prompt rows x examples. Without `pairs`: all (P, N, K); with `pairs`
        (R, 2) of (prompt, example) indices: (R, K)."""
        if pairs is None:
            p, n = torch.meshgrid(torch.arange(len(z)), torch.arange(len(input_ids)), indexing="ij")
            return self.label_logits(z, input_ids, lengths, torch.stack([p.ravel(), n.ravel()], 1)).reshape(
                len(z), len(input_ids), -1)
        prompts = self.prompts(z)[pairs[:, 0]]                        # (R, L, D)
        ids, lens = input_ids[pairs[:, 1]], lengths[pairs[:, 1]]
        embeds = self.model.get_input_embeddings()(ids)               # (R, T, D)
        embeds = add_at_slots(embeds, prompts)
        hidden = self.model.base_model(inputs_embeds=embeds).last_hidden_state
        last = hidden[torch.arange(len(lens)), lens - 1]              # (R, D)
        return self.model.get_output_embeddings()(last)[:, self.label_ids]

    # --- distillation ------------------------------------------------------------------------
    def add(self, z: np.ndarray, teacher_logits: np.ndarray) -> None:
        # Copies: arrays that come through Ray's object store are read-only views, which
        # torch.from_numpy (checkpointing) warns about.
        self.buffer_z.append(np.array(z, np.float32))
        self.buffer_logits.append(np.array(teacher_logits, np.float32))

    def train(self, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> float:
        """`steps` Adam steps, each on the newest generation's rows plus `replay` older rows.
        Returns the mean loss. The rows drawn depend only on the seed and the buffer: fixed work."""
        s = self.settings
        newest = len(self.buffer_z) - 1
        z_all = torch.from_numpy(np.concatenate(self.buffer_z))
        t_all = torch.from_numpy(np.concatenate(self.buffer_logits))  # (sum P, N, K)
        n_examples = t_all.shape[1]
        first_newest = len(z_all) - len(self.buffer_z[newest])
        newest_rows = [(p, n) for p in range(first_newest, len(z_all)) for n in range(n_examples)]
        self.model.train()
        losses = []
        for _ in range(s.steps):
            rows = list(newest_rows)
            if first_newest > 0 and s.replay:
                old_p = self.rng.integers(0, first_newest, s.replay)
                old_n = self.rng.integers(0, n_examples, s.replay)
                rows += list(zip(old_p.tolist(), old_n.tolist()))
            pairs = torch.tensor(rows)
            student = self.label_logits(z_all, input_ids, lengths, pairs)
            loss = distill_loss(student, t_all[pairs[:, 0], pairs[:, 1]], labels[pairs[:, 1]], s)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
        self.model.eval()
        return float(np.mean(losses))

    # --- what the search uses ----------------------------------------------------------------
    def task_losses(self, z: np.ndarray, input_ids, lengths, labels) -> np.ndarray:
        """The student's estimate of the teacher's task loss (CE on gold labels) for each z (P,)."""
        with torch.no_grad():
            logits = self.label_logits(torch.from_numpy(np.asarray(z, np.float32)), input_ids, lengths)
            return np.array([float(F.cross_entropy(l, labels)) for l in logits])

    def descend(self, start: np.ndarray, input_ids, lengths, labels, sigma: float) -> np.ndarray:
        """`grad_steps` normalised gradient steps on the student's task loss from `start` (d,).
        Returns the path (grad_steps, d). Step length grad_lr * sigma * sqrt(d): the scale of one
        search step, so the student's move is commensurate with the population's spread."""
        s = self.settings
        z = torch.from_numpy(np.asarray(start, np.float32)).clone()
        step = s.grad_lr * sigma * np.sqrt(len(z))
        path = []
        for _ in range(s.grad_steps):
            z.requires_grad_(True)
            logits = self.label_logits(z[None], input_ids, lengths)[0]
            loss = F.cross_entropy(logits, labels)
            (grad,) = torch.autograd.grad(loss, z)
            with torch.no_grad():
                z = z - step * grad / (grad.norm() + 1e-12)
            path.append(z.detach().numpy().astype(np.float64))
        return np.stack(path)

    # --- checkpoint --------------------------------------------------------------------------
    def state_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "A": self.A.detach(), "opt": self.opt.state_dict(),
                    "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "buffer_z": [torch.from_numpy(z) for z in self.buffer_z],
                    "buffer_logits": [torch.from_numpy(t) for t in self.buffer_logits]}, buf)
        return buf.getvalue()

    def load_state(self, data: bytes) -> None:
        # `data` comes out of a checkpoint whose signature load_checkpoint checked (this installation
        # wrote it), and torch's restricted unpickler reads it besides.
        state = torch.load(io.BytesIO(data), weights_only=True)
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            self.A.copy_(state["A"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        self.buffer_z = [z.numpy() for z in state["buffer_z"]]
        self.buffer_logits = [t.numpy() for t in state["buffer_logits"]]
        torch.set_rng_state(state["torch_rng"])
