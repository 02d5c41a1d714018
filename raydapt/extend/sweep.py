"""The learning-vs-forgetting picture of neutral residues (Signe Talla, Grave, Jegou, ICML 2025, fig. 1):
one run per (method, learning rate), each a point (original-domain loss, new-language loss); the
Pareto front is the set of points no other point beats on both axes (both losses: lower is better).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from raydapt.config import check
from raydapt.outputs import write_json

__all__ = ["pareto_front", "sweep_grid", "run_sweep", "plot_tradeoff"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (x and y both lower is better), by x."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any((u <= x and v <= y) and (u < x or v < y) for u, v in points)]
    return sorted(keep, key=lambda i: points[i])


def _split(text: str, cast, name: str) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        check(False, name, f"{text!r} is not a comma-separated list")
    check(len(values) == len(set(values)), name, f"{text!r} repeats a value")
    return values


def sweep_grid(cfg) -> list:
    """The configs of a sweep: every --sweep-methods x --sweep-lrs (either defaults to the run's own)."""
    from raydapt.adapters.config import METHODS

    methods = _split(cfg.sweep_methods, str, "sweep_methods") or [cfg.method]
    unknown = [m for m in methods if m not in METHODS]
    check(not unknown, "sweep_methods", f"unknown method {unknown[:1]}; accepted: {', '.join(METHODS)}")
    lrs = _split(cfg.sweep_lrs, float, "sweep_lrs") or [cfg.lr]
    check(all(lr > 0 for lr in lrs), "sweep_lrs", f"every learning rate must be > 0, got {lrs}")
    out = Path(cfg.output_dir)
    return [dataclasses.replace(cfg, method=m, lr=lr, sweep_methods="", sweep_lrs="",
                                output_dir=str(out / f"{m}-lr{lr:g}")) for m in methods for lr in lrs]


def run_sweep(cfg, make_runtime, run_one) -> dict:
    """Every run of the grid (`run_one(cfg, make_runtime)`; a finished one is kept on --resume), then
    sweep.json and tradeoff.png in --output-dir."""
    runs = []
    for sub in sweep_grid(cfg):
        done = Path(sub.output_dir, "result.json")
        if cfg.resume and done.exists():
            from raydapt.outputs import read_json
            runs.append(read_json(done))
            continue
        runs.append(run_one(sub, make_runtime))
    points = [(r["original_loss"], r["new_loss"]) for r in runs]
    front = pareto_front(points)
    base = runs[0]["backbone_losses"]
    summary = {"runs": [{k: r[k] for k in ("method", "lr", "seed", "original_loss", "new_loss", "gate_mean")}
                        for r in runs],
               "pareto": [f"{runs[i]['method']}@{runs[i]['lr']:g}" for i in front],
               "backbone": {"original_loss": base["original_eval"], "new_loss": base["new_test"]}}
    write_json(Path(cfg.output_dir) / "sweep.json", summary)
    plot_tradeoff(Path(cfg.output_dir) / "tradeoff.png", summary)
    return summary


def plot_tradeoff(path: Path, summary: dict) -> None:
    """One point per (method, lr), one colour per method, the Pareto front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        mine = [r for r in runs if r["method"] == method]
        ax.plot([r["original_loss"] for r in mine], [r["new_loss"] for r in mine], "o-", color=f"C{i}", label=method)
        for r in mine:
            ax.annotate(f"{r['lr']:g}", (r["original_loss"], r["new_loss"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto_front([(r["original_loss"], r["new_loss"]) for r in runs])
    ax.step([runs[i]["original_loss"] for i in front], [runs[i]["new_loss"] for i in front], "k--", where="post",
            lw=0.8, label="Pareto front")
    b = summary["backbone"]
    ax.plot([b["original_loss"]], [b["new_loss"]], "k*", ms=12, label="backbone")
    ax.set_xlabel("original-domain loss (forgetting: lower is better)")
    ax.set_ylabel("new-language loss (learning: lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
