"""The typed config of GDFO jobs: BBT's fields plus the student's and the harmonisation's."""
from __future__ import annotations

from dataclasses import dataclass

from raydapt.bbt.config import QUICK as BBT_QUICK
from raydapt.bbt.config import BBTConfig
from raydapt.config import check, check_directory, check_positive, field
from raydapt.gdfo.student import StudentSettings

__all__ = ["GDFOConfig", "QUICK"]


@dataclass
class GDFOConfig(BBTConfig):
    """GDFO: BBT's derivative-free prompt search harmonised with gradient steps through a white-box
    student distilled online from the black-box teacher's answers (docs/gdfo.md)."""
    variant: str = field("gdfo", "gdfo: CMA-ES/nevergrad plus injected gradient points; gradient: "
                         "gradient steps through the student only (ablation)", choices=("gdfo", "gradient"))
    student: str = field("", "checkpoint dir of the white-box student (default: the built small LM)")
    student_map: str = field("projection", "z -> student prompt: its own seeded projection (fixed) or "
                             "learned with the student", choices=("projection", "learned"))
    temperature: float = field(4.0, "distillation temperature T")
    distill: str = field("soft_ce", "distillation loss", choices=("soft_ce", "kl"))
    hard_weight: float = field(0.0, "weight of the gold-label loss added to the distillation loss")
    student_lr: float = field(1e-3, "Adam learning rate of the student")
    student_steps: int = field(4, "student Adam steps per generation (fixed work)")
    replay: int = field(64, "rows replayed from older generations per student step")
    grad_steps: int = field(5, "gradient steps on z per generation (the path the injected points come from)")
    grad_lr: float = field(0.5, "length of one normalised gradient step, in units of sigma * sqrt(d)")
    grad_start: str = field("best", "where gradient steps start: the best z so far, or the CMA mean (cma only)",
                            choices=("best", "mean"))
    max_inject: int = field(4, "most gradient points added to a generation (each costs one API call)")
    trust: str = field("adaptive", "how many to inject: adaptive = max_inject * the student's Spearman rho with "
                       "the teacher on the optimizer's candidates, averaged over --trust-window generations "
                       "(0 unless significant); always; never",
                       choices=("adaptive", "always", "never"))
    output_dir: str = field("runs/gdfo", "where result.json, the prompt, the student, the log and the checkpoint go")
    trust_window: int = field(5, "adaptive trust uses the mean rho of this many recent generations, and only "
                              "when it exceeds twice its no-agreement sd, 1/sqrt(window * (popsize - 1))")
    min_trust: float = field(0.2, "inject nothing while rho is below this: a student that ranks the "
                             "teacher's candidates no better than noise must not spend API calls")
    baseline: str = field("bbt", "also run BBT with the same seed and budget first, and compare",
                          choices=("bbt", "none"))
    diagnose_gradient: bool = field(False, "each generation, the cosine between the student's gradient and the "
                                    "teacher's true one at the student's start point, computed in this process from "
                                    "--model's checkpoint (a white box) and never given to the search")
    guided_share: float = field(0.0, "share of the points CMA-ES asks each generation that are instead sampled, in "
                                "antithetic pairs around its mean, in the span of the student's last "
                                "--guided-history gradient directions (guided ES); no extra API calls; 0: off")
    guided_history: int = field(3, "how many of the student's recent gradient directions span the guided subspace")
    guided_source: str = field("student", "the guided directions: the student's gradients, or seeded random "
                               "directions (the control: the same sampling geometry without the student)",
                               choices=("student", "random"))

    def __post_init__(self):
        super().__post_init__()
        check_directory(self.student, "student", "the built small LM")
        check(self.method == "bbt", "method", "GDFO searches BBT's input prompt; bbtv2 is not supported")
        check(self.optimizer != "lq-cma", "optimizer", "lq-cma is told only the points it asked; GDFO tells "
              "CMA-ES extra (gradient) points: use cma or a nevergrad optimizer")
        check(self.mode == "add", "mode", "GDFO uses add mode (the student adds the same z at its slots)")
        check_positive(self.temperature, "temperature")
        check(self.student_lr >= 0, "student_lr", f"must be >= 0, got {self.student_lr}")
        check(self.grad_lr >= 0, "grad_lr", f"must be >= 0, got {self.grad_lr}")
        check(self.hard_weight >= 0, "hard_weight", f"must be >= 0, got {self.hard_weight}")
        check(self.student_steps >= 0, "student_steps", f"must be >= 0, got {self.student_steps}")
        check(self.replay >= 0, "replay", f"must be >= 0, got {self.replay}")
        check(self.grad_steps >= 1, "grad_steps", f"must be >= 1, got {self.grad_steps}")
        check(0 <= self.max_inject <= self.grad_steps, "max_inject", f"must be in [0, --grad-steps], got {self.max_inject}")
        check(self.trust_window >= 1, "trust_window", f"must be >= 1, got {self.trust_window}")
        check(-1 <= self.min_trust <= 1, "min_trust", f"must be in [-1, 1], got {self.min_trust}")
        check(self.grad_start == "best" or self.optimizer == "cma", "grad_start", "mean needs --optimizer cma")
        check(0 <= self.guided_share < 1, "guided_share", f"must be in [0, 1), got {self.guided_share}")
        check(self.guided_share == 0 or (self.optimizer == "cma" and self.variant == "gdfo"), "guided_share",
              "guided sampling needs CMA-ES's mean and step size: --optimizer cma, --variant gdfo")
        check(self.guided_share == 0 or self.guided_points() >= 2, "guided_share",
              f"{self.guided_share} of --popsize {self.popsize} is less than one antithetic pair")
        check(self.guided_history >= 1, "guided_history", f"must be >= 1, got {self.guided_history}")

    def guided_points(self) -> int:
        """Asked points replaced by guided samples each generation: an even number (antithetic pairs)."""
        return 2 * int(self.guided_share * self.popsize / 2)

    def student_settings(self) -> StudentSettings:
        return StudentSettings(temperature=self.temperature, distill=self.distill, hard_weight=self.hard_weight,
                               lr=self.student_lr, steps=self.student_steps, replay=self.replay,
                               train_map=self.student_map == "learned", grad_steps=self.grad_steps,
                               grad_lr=self.grad_lr, seed=self.seed * 7919 + 17)


QUICK = dict(BBT_QUICK)
