"""Is GDFO's gradient signal worth anything here? Three measurements behind docs/gdfo.md's diagnosis.

(a) The student alone: its own prompt (L slots of its width) tuned white-box by Adam on the train
    set (`raydapt.gradient_prompt.tune_prompt`, as `gradient-white-box` tunes the teacher's), and
    its z tuned through its own projection A_S; the teacher's test accuracy at that z says whether
    a z good for the student transfers.
(b) Over a GDFO run (the job's own search, in-process): at every generation's gradient start point
    z0, the cosine between the student's gradient of the task loss and the teacher's true one
    (computable only here: the default teacher is a local white box), and the teacher's loss change
    after one step of the job's step length along each (student: what GDFO injects; teacher: what
    a perfect student would give). A random direction's |cosine| is about 1/sqrt(d).
(c) The population's loss spread around z = 0 against the search radius: std and mean-minus-best of
    the teacher's loss over P points z ~ N(0, r^2 I), r in RADII (A as the job builds it, so r = 1
    is the job's sigma = 1).

    python bench/gdfo_diagnosis.py [--quick] [--seed 7] [--output results/bench/gdfo_diagnosis.json]

The teacher's gradient never reaches the search: it is computed beside the run, in this script.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from actors.runner import LocalRuntime
from raydapt.bbt.losses import accuracy
from raydapt.defaults import default_model_dir
from raydapt.gdfo.config import QUICK, GDFOConfig
from raydapt.bbt.job import run_search_job
from raydapt.config import parse_args
from raydapt.gdfo.job import _gdfo_result
from raydapt.gdfo.diagnosis import cosine, task_gradient as gradient, task_loss
from raydapt.gdfo.search import GDFOSearch
from raydapt.gdfo.student import Student, StudentSettings
from raydapt.gdfo.worker import InlineStudent, StudentWorker
from raydapt.gradient_prompt import prompted_label_logits, tune_prompt
from raydapt.results import bench_output, machine, write_bench

RADII = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _load(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).float().eval()


class DiagnosedGDFO(GDFOSearch):
    """The job's GDFO search, plus per-generation gradient agreement measured with the teacher's
    white box (a `Student` wrapper around the teacher model with the job's own A_T)."""

    teacher_model = None
    rows: list = []
    last_data = last_space = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).last_data, type(self).last_space = self.data, self.space

    def step(self, state):
        start = self._start_point(state)
        row = super().step(state)
        student = self.student._worker.student  # InlineStudent: the distilled student, after this generation's fit
        teacher = Student(self.teacher_model, self.space, self.data.label_ids, StudentSettings())
        train = self.data.train
        if len(self.rows) == 0:  # the wrapper must be the oracle's teacher: same loss at the best point
            mine = task_loss(teacher, state.best_train_z, train)
            assert abs(mine - state.best_train_loss) < 1e-3, (mine, state.best_train_loss)
        g_s, loss_s = gradient(student, start, train)
        g_t, loss_t = gradient(teacher, start, train)
        length = self.cfg.grad_lr * self.cfg.sigma * np.sqrt(len(start))  # the job's step length
        step_loss = {name: task_loss(teacher, start - length * g / (np.linalg.norm(g) + 1e-12), train) - loss_t
                     for name, g in (("student", g_s), ("teacher", g_t))}
        self.rows.append({"generation": row["generation"], "api_calls": row["api_calls"], "rho": row["rho"],
                          "cosine": cosine(g_s, g_t), "teacher_loss": loss_t, "student_loss": loss_s,
                          "teacher_loss_change_student_step": step_loss["student"],
                          "teacher_loss_change_teacher_step": step_loss["teacher"],
                          "population_spread": row["population_mean_loss"] - row["population_best_loss"]})
        return row


def run_diagnosed(cfg: GDFOConfig, teacher_model) -> tuple[dict, list]:
    """The GDFO job's search (as `run_gdfo_job --baseline none --local` runs it) with the diagnosis."""
    DiagnosedGDFO.teacher_model, DiagnosedGDFO.rows = teacher_model, []
    search = functools.partial(DiagnosedGDFO, start_student=InlineStudent)
    result = run_search_job(cfg, LocalRuntime(), search, _gdfo_result, "gdfo")
    return result, DiagnosedGDFO.rows


def student_alone(cfg: GDFOConfig, data, student_model, teacher: Student, student: Student) -> dict:
    """(a): the student's own white-box prompt; its z tuned through A_S, and the teacher at that z."""
    tr, te = data.train, data.test
    prompt = tune_prompt(student_model, tr.input_ids, tr.lengths, tr.labels, data.label_ids, cfg.prompt_length,
                         steps=200, lr=0.01, seed=cfg.seed)

    def student_acc(split, p):
        return float(accuracy(prompted_label_logits(student_model, split.input_ids, split.lengths, p,
                                                    data.label_ids).numpy(), split.labels))

    z = torch.zeros(cfg.intrinsic_dim, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    ids, lens, labels = (torch.as_tensor(a) for a in (tr.input_ids, tr.lengths, tr.labels))
    for _ in range(200):
        loss = F.cross_entropy(student.label_logits(z[None], ids, lens)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    zs = z.detach().numpy().astype(np.float64)

    def z_acc(model, split):
        ids, lens = torch.as_tensor(split.input_ids), torch.as_tensor(split.lengths)
        with torch.no_grad():
            logits = model.label_logits(torch.tensor(zs[None], dtype=torch.float32), ids, lens)[0]
        return float(accuracy(logits.numpy(), split.labels))

    return {"student_manual_test_accuracy": student_acc(data.manual_test, None),
            "student_white_box_prompt_test_accuracy": student_acc(te, prompt),
            "student_white_box_prompt_train_accuracy": student_acc(tr, prompt),
            "student_z_white_box_test_accuracy": z_acc(student, te),
            "teacher_test_accuracy_at_student_z": z_acc(teacher, te),
            "teacher_test_accuracy_at_z0": float(accuracy(teacher.label_logits(
                torch.zeros(1, cfg.intrinsic_dim), torch.as_tensor(te.input_ids),
                torch.as_tensor(te.lengths)).detach()[0].numpy(), te.labels)),
            "student_z_norm": float(np.linalg.norm(zs))}


def spread(cfg: GDFOConfig, data, teacher: Student) -> list[dict]:
    """(c): the teacher's loss over P Gaussian points around 0, per radius."""
    rng = np.random.default_rng(cfg.seed)
    tr = data.train
    ids, lens, labels = (torch.as_tensor(a) for a in (tr.input_ids, tr.lengths, tr.labels))
    rows = []
    for r in RADII:
        z = rng.normal(0.0, r, (cfg.popsize, cfg.intrinsic_dim))
        losses = teacher.task_losses(z, ids, lens, labels)
        rows.append({"radius": r, "loss_std": float(np.std(losses)), "mean_minus_best": float(losses.mean() - losses.min()),
                     "best": float(losses.min()), "mean": float(losses.mean())})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick preset (else the default preset)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--flags", default="", help="extra GDFO flags, e.g. '--student-steps 16'")
    parser.add_argument("--output", default=str(bench_output("gdfo_diagnosis")))
    args = parser.parse_args(argv)
    load = os.getloadavg()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--seed", str(args.seed), "--baseline", "none", "--local", "--output-dir", f"{tmp}/gdfo",
                *(["--quick"] if args.quick else []), *args.flags.split()]
        cfg = parse_args(GDFOConfig, argv, presets={"quick": QUICK})
        cfg = dataclasses.replace(cfg, student=cfg.student or str(default_model_dir("small")),
                                  model=cfg.model or str(default_model_dir("large")))
        teacher_model, student_model = _load(cfg.model), _load(cfg.student)
        for p in list(teacher_model.parameters()) + list(student_model.parameters()):
            p.requires_grad_(False)
        result, rows = run_diagnosed(cfg, teacher_model)
        data, space = DiagnosedGDFO.last_data, DiagnosedGDFO.last_space
        teacher = Student(teacher_model, space, data.label_ids, StudentSettings())
        fresh = StudentWorker(cfg.student, cfg.student_settings(), data.label_ids,
                              (data.train.input_ids, data.train.lengths, data.train.labels), cfg.intrinsic_dim,
                              cfg.prompt_length, cfg.alpha, cfg.sigma, cfg.projection).student
        for p in fresh.model.parameters():
            p.requires_grad_(False)
        alone = student_alone(cfg, data, student_model, teacher, fresh)
        radii = spread(cfg, data, teacher)
    cos = np.array([r["cosine"] for r in rows])
    thirds = np.array_split(cos, 3)
    figures = {"preset": "quick" if args.quick else "default", "seed": args.seed, "flags": args.flags,
               "intrinsic_dim": cfg.intrinsic_dim, "random_direction_abs_cosine": float(np.sqrt(2 / np.pi / cfg.intrinsic_dim)),
               "gdfo_test_accuracy": result["test_accuracy"], "gdfo_dev_accuracy": result["dev_accuracy"],
               "rho_mean": result["student_agreement_mean"],
               "cosine_mean": float(cos.mean()), "cosine_by_third": [float(t.mean()) for t in thirds],
               "cosine_positive_share": float((cos > 0).mean()),
               "student_step_lowers_teacher_loss_share": float(np.mean([r["teacher_loss_change_student_step"] < 0 for r in rows])),
               "teacher_step_lowers_teacher_loss_share": float(np.mean([r["teacher_loss_change_teacher_step"] < 0 for r in rows])),
               "student_step_mean_change": float(np.mean([r["teacher_loss_change_student_step"] for r in rows])),
               "teacher_step_mean_change": float(np.mean([r["teacher_loss_change_teacher_step"] for r in rows])),
               "population_spread_mean": float(np.mean([r["population_spread"] for r in rows])),
               "student_alone": alone, "spread_by_radius": radii, "generations": rows, "machine": machine(load)}
    write_bench(args.output, figures)
    print({k: v for k, v in figures.items() if k not in ("generations", "machine")})


if __name__ == "__main__":
    main()
