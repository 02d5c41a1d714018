"""The GDFO coordinator: BBT's loop, with a distilled student's gradient points in the population.

Generation g (docs/gdfo.md has the equations):
  1. ask P candidates Z_g (with --guided-share, some are sampled in the span of the student's recent
     gradient directions instead); add n_g points G_g from the student's gradient path of generation
     g-1, n_g = round(max_inject * max(0, rho_{g-1})) with rho the student's forecast quality;
  2. the student (its own actor) learns from the teacher's answers to generation g-1, forecasts the
     loss of Z_g + G_g, and descends from the best z so far: fixed work, started before step 3;
  3. the teacher scores Z_g + G_g in one oracle request, concurrently with step 2;
  4. tell all P + n_g losses to CMA-ES: the teacher's answers decide what stays;
  5. collect the student's result (the time spent waiting for it is measured) and checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from raydapt.bbt.losses import accuracy
from raydapt.bbt.search import PromptSearch, SearchState
from raydapt.gdfo.diagnosis import TeacherGradient
from raydapt.gdfo.student import descent_direction, spearman
from raydapt.gdfo.worker import InlineStudent

__all__ = ["GDFOState", "GDFOSearch", "guided_samples", "trust_level"]


def trust_level(rhos: list[float], window: int, points: int, min_trust: float) -> float:
    """How far to trust the student: the mean of its last `window` per-generation Spearman rhos, if
    that mean is both >= `min_trust` and significant, else 0.

    One generation's rho over P points has sd ~ 1/sqrt(P - 1) under no agreement (0.23 at P = 20):
    one lucky generation would pass any fixed threshold. The mean of W generations has sd
    1/sqrt(W (P - 1)); it must exceed twice that (one-sided p ~ 0.02).
    """
    recent = [r for r in rhos[-window:] if r is not None]
    if not recent:
        return 0.0
    mean = float(np.mean(recent))
    noise = 1.0 / np.sqrt(len(recent) * max(points - 1, 1))
    return mean if mean >= max(min_trust, 2.0 * noise) else 0.0


def guided_samples(mean: np.ndarray, std: float, guides: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Guided ES (Maheswaranathan et al., ICML 2019): n antithetic samples mean +- u, (n, d), u
    Gaussian in the span of `guides` (k, d) and as long as a sample of N(mean, std^2 I_d) (about
    std sqrt(d)). The teacher ranks both signs, so a direction that helps moves CMA-ES's mean along
    it, and a useless one costs only the diversity of the n samples it replaced."""
    basis, _ = np.linalg.qr(np.asarray(guides, np.float64).T)  # (d, k) orthonormal
    d, k = basis.shape
    steps = rng.standard_normal((n // 2, k)) @ basis.T * std * np.sqrt(d / k)
    return np.concatenate([mean + steps, mean - steps])


@dataclass
class GDFOState(SearchState):
    student: bytes | None = None
    learn: tuple | None = None          # (z, teacher logits) of the last generation, to learn next
    path: np.ndarray | None = None      # the student's last gradient path (grad_steps, d)
    rho: float | None = None            # Spearman(student forecast, teacher loss), last generation
    rhos: list = field(default_factory=list)
    cosines: list = field(default_factory=list)  # --diagnose-gradient: student vs teacher gradient, per generation
    white_box_gap: float | None = None  # --diagnose-gradient: |white-box - oracle loss| at generation 1's first point
    injected: int = 0
    injected_won: int = 0               # generations whose best candidate was a gradient point
    guides: np.ndarray | None = None    # --guided-share: the student's last gradient directions (k, d), unit
    guided_won: int = 0                 # generations whose best candidate was a guided sample
    wait_s: float = 0.0                 # coordinator time blocked on the student
    student_s: float = 0.0              # student compute time
    teacher_s: float = 0.0              # teacher (oracle) time


class GDFOSearch(PromptSearch):
    def __init__(self, cfg, oracle, data, space, out_dir, progress=tqdm.write, reporter=None,
                 start_student=InlineStudent):
        """`start_student(*worker_args)` returns a handle with `submit(method, *args) -> future`:
        `InlineStudent` (this process) or, from the Ray side, an actor (`actors.student.RayStudent`)."""
        super().__init__(cfg, oracle, data, space, out_dir, progress, reporter)
        train = (data.train.input_ids, data.train.lengths, data.train.labels)
        self.student = start_student(cfg.student, cfg.student_settings(), data.label_ids, train, cfg.intrinsic_dim,
                                     cfg.prompt_length, cfg.alpha, cfg.sigma, cfg.projection)
        self.teacher_gradient = (TeacherGradient(cfg.model, space, data.label_ids, data.train)
                                 if cfg.diagnose_gradient else None)

    # --- state -------------------------------------------------------------------------------
    def fresh_state(self) -> GDFOState:
        base = super().fresh_state()
        return GDFOState(**{k: getattr(base, k) for k in SearchState.__dataclass_fields__})

    def resume(self) -> GDFOState:
        state = super().resume()
        if state.student is not None:
            self.student.submit("load_state", state.student).result()
        return state

    # --- one generation ----------------------------------------------------------------------
    def _start_point(self, state: GDFOState) -> np.ndarray:
        opt = self.optimizers[0]
        if self.cfg.grad_start == "mean":
            return opt.mean()
        best = opt.best()[0] if self.cfg.variant == "gdfo" else state.best_train_z
        return np.zeros(self.cfg.intrinsic_dim) if best is None else best

    def _injections(self, state: GDFOState, room: int) -> np.ndarray:
        cfg = self.cfg
        if state.path is None:
            return np.zeros((0, cfg.intrinsic_dim))
        if cfg.variant == "gradient":
            return state.path[:room]
        trust = {"always": 1.0, "never": 0.0}.get(cfg.trust)
        if trust is None:
            trust = trust_level(state.rhos, cfg.trust_window, cfg.popsize, cfg.min_trust)
        n = min(int(round(cfg.max_inject * trust)), room)
        return state.path[len(state.path) - n:] if n else np.zeros((0, cfg.intrinsic_dim))

    def _population(self, state: GDFOState) -> np.ndarray:
        cfg = self.cfg
        if cfg.variant == "gradient":
            if state.path is None:  # bootstrap: a Gaussian population around 0, for the student to learn from
                rng = np.random.default_rng(cfg.seed)
                return rng.normal(0, cfg.sigma, (cfg.popsize, cfg.intrinsic_dim))
            return np.zeros((0, cfg.intrinsic_dim))
        return np.asarray(self.optimizers[0].ask(), dtype=np.float64)

    def _guided(self, state: GDFOState, asked: np.ndarray, n: int) -> np.ndarray:
        """The last n asked points become guided samples (`guided_samples`), seeded by (seed,
        generation): a resumed run samples the same points."""
        opt = self.optimizers[0]
        rng = np.random.default_rng([self.cfg.seed, state.generation, 0x6D1DED])
        return np.concatenate([asked[:len(asked) - n], guided_samples(opt.mean(), opt.sample_std(), state.guides, n, rng)])

    def _remember_direction(self, state: GDFOState, start: np.ndarray, path: np.ndarray) -> None:
        """Keep the student's descent direction at `start` (its path's first step) for guided sampling,
        or, as the control, a seeded random direction."""
        if self.cfg.guided_source == "random":
            direction = np.random.default_rng([self.cfg.seed, state.generation, 0xD1CE]).standard_normal(len(start))
        else:
            direction = descent_direction(start, path)
        norm = np.linalg.norm(direction)
        if norm > 0:
            rows = [] if state.guides is None else list(state.guides)
            state.guides = np.stack([*rows, direction / norm][-self.cfg.guided_history:])

    def step(self, state: GDFOState) -> dict:
        cfg = self.cfg
        asked = self._population(state)
        guided = cfg.guided_points() if state.guides is not None else 0  # the last `guided` asked points
        if guided:
            asked = self._guided(state, asked, guided)
        injected = self._injections(state, max(0, cfg.budget - state.api_calls - len(asked)))
        z = np.concatenate([asked, injected])                          # (P + n, d)
        start = self._start_point(state)
        pending = self.student.submit("generation", z, state.learn, start)  # runs beside the teacher
        began = time.perf_counter()
        logits = self.score(self.data.train, self.prompts(z))          # (P + n, N, K)
        state.teacher_s += time.perf_counter() - began
        losses = self.loss_fn(logits, self.data.train.labels)
        if cfg.variant == "gdfo":
            self.optimizers[0].tell(z, losses)
        waited = time.perf_counter()
        out = pending.result()
        state.wait_s += time.perf_counter() - waited
        state.student_s += out["compute_s"]
        state.student, state.path, state.learn = out["state"], out["path"], (z.astype(np.float32), logits)
        if cfg.guided_points():
            self._remember_direction(state, start, out["path"])
        # Agreement on the optimizer's own samples only: the student's proposals are points it
        # descended to, where its forecast is biased low (with no asked points: all of them).
        ranked = slice(0, len(asked)) if len(asked) >= 3 else slice(None)
        state.rho = spearman(out["predicted"][ranked], losses[ranked])
        state.rhos.append(state.rho)
        if self.teacher_gradient is not None:
            if state.white_box_gap is None:  # is the white box the oracle's model? (else the cosine means nothing)
                state.white_box_gap = abs(self.teacher_gradient.loss(z[0]) - float(losses[0]))
            state.cosines.append(self.teacher_gradient.student_cosine(start, out["path"]))
        state.api_calls += len(z)
        state.generation += 1
        best = int(np.argmin(losses))
        state.injected += len(injected)
        # Won: a gradient point beat every point the optimizer asked. Without asked points (the
        # gradient-only ablation) every winner is a gradient point by construction: not counted.
        won = bool(len(asked) > 0 and len(injected) > 0 and best >= len(asked))
        state.injected_won += int(won)
        guided_won = bool(guided and len(asked) - guided <= best < len(asked))
        state.guided_won += int(guided_won)
        if losses[best] < state.best_train_loss:
            state.best_train_loss, state.best_train_z = float(losses[best]), z[best].copy()
        return {"generation": state.generation, "layer": 0, "api_calls": state.api_calls,
                "population_mean_loss": float(np.mean(losses)), "population_best_loss": float(losses[best]),
                "best_train_loss": state.best_train_loss, "injected": len(injected),
                "injected_won": won, "rho": state.rho,
                **({"guided": guided, "guided_won": guided_won} if cfg.guided_points() else {}),
                **({"gradient_cosine": state.cosines[-1]} if self.teacher_gradient is not None else {}),
                "student_loss": out["train_loss"], "student_wait_s": round(state.wait_s, 4),
                "train_accuracy_of_best": float(accuracy(logits[best], self.data.train.labels))}

    def generation_calls(self, state: GDFOState) -> int:
        if self.cfg.variant == "gradient" and state.path is not None:
            return self.cfg.grad_steps  # the student's path is the population
        return self.cfg.popsize

    def summary(self, state: GDFOState) -> dict:
        recent = state.rhos[-10:]
        return {"variant": self.cfg.variant, "student_agreement_last10": float(np.mean(recent)) if recent else None,
                "student_agreement_mean": float(np.mean(state.rhos)) if state.rhos else None,
                "gradient_cosine_mean": float(np.mean(state.cosines)) if state.cosines else None,
                "white_box_loss_gap": state.white_box_gap,
                "injected_points": state.injected,
                "generations_won_by_gradient_points": state.injected_won if self.cfg.variant == "gdfo" else None,
                # Compare with --guided-source random (the same sampling), not with guided_points / popsize.
                **({"guided_points_per_generation": self.cfg.guided_points(),
                    "generations_won_by_guided_points": state.guided_won} if self.cfg.guided_points() else {}),
                "student_wait_s": state.wait_s, "student_compute_s": state.student_s,
                "teacher_time_s": state.teacher_s,
                # What the student's process holds: its own tensors only (an audit of the boundary).
                "student_process": self.student.submit("tensor_shapes").result()}

