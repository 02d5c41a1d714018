"""The MLtD section of RESULTS.md, from the result.json files of jobs/suite.py's `mltd-*` runs: test
perplexity per held-out domain and averaged (mean ± std over seeds), each step of the paper's ordering
tested on paired seeds, the trainable-parameter share, and the low-data curve."""
from __future__ import annotations

import os
import statistics
from pathlib import Path

__all__ = ["ORDERING", "LOW_DATA_METHODS", "LOW_DATA_SIZES", "LOW_DATA_DOMAIN", "mltd_section"]

# The paper's ordering (Hou, Salazar, Polovets, TACL 2022, table 2), worst to best, then the other baselines.
ORDERING = ("zero-shot", "full", "tarp", "tarp-meta", "tams-meta")
OTHERS = ("lora", "multitask")
# Beyond the paper's chain: does meta-learning beat the multitask control, does TARP beat LoRA?
CONTROLS = (("multitask", "tarp-meta"), ("lora", "tarp"))
LOW_DATA_METHODS = ("tarp", "lora", "full")
LOW_DATA_SIZES = (50, 100, 200, 500)
LOW_DATA_DOMAIN = "pydoc"


def _ms(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _paired(worse: list[dict], better: list[dict]) -> tuple[list[float], float]:
    """Differences worse − better of the mean perplexity, paired by seed, and the paired t-test's p."""
    from scipy import stats

    by_seed = {r["seed"]: r for r in better}
    pairs = [(r["mean_perplexity"], by_seed[r["seed"]]["mean_perplexity"]) for r in worse if r["seed"] in by_seed]
    diffs = [a - b for a, b in pairs]
    p = float(stats.ttest_rel(*zip(*pairs)).pvalue) if len(pairs) >= 2 and len(set(diffs)) > 1 else float("nan")
    return diffs, p


def _step_verdict(diffs: list[float], p: float) -> str:
    if p != p:
        return "not tested (one seed or no spread)"
    if p >= 0.05:
        return "does not hold: no difference beyond the noise"
    return "holds" if statistics.mean(diffs) > 0 else "does not hold: reversed"


def _ordering(rows: dict[str, list[dict]]) -> list[str]:
    methods = [m for m in (*ORDERING, *OTHERS) if f"mltd-{m}" in rows]
    domains = sorted({d for m in methods for r in rows[f"mltd-{m}"] for d in r["perplexity"]})
    lines = ["| method | seeds | trainable share | " + " | ".join(domains) + " | mean |",
             "|---|---|---|" + "---|" * (len(domains) + 1)]
    for m in methods:
        rs = rows[f"mltd-{m}"]
        cells = [_ms([r["perplexity"][d] for r in rs if d in r["perplexity"]]) for d in domains]
        lines.append(f"| {m} | {len(rs)} | {100 * rs[0]['trainable_share']:.2f}% | " + " | ".join(cells) +
                     f" | {_ms([r['mean_perplexity'] for r in rs])} |")
    lines += ["", "Each step of the paper's ordering (zero-shot > full > TARP > TARP + meta > TARP + TAMS + meta, "
              "in perplexity), then the controls (multitask > TARP + meta, LoRA > TARP), on the mean perplexity paired by seed (scipy's paired t-test; a step holds only "
              "when the difference is positive and p < 0.05):", "",
              "| step | difference (paired, mean ± std) | p | verdict |", "|---|---|---|---|"]
    for worse, better in [*zip(ORDERING, ORDERING[1:]), *CONTROLS]:
        if f"mltd-{worse}" in rows and f"mltd-{better}" in rows:
            diffs, p = _paired(rows[f"mltd-{worse}"], rows[f"mltd-{better}"])
            shown = "–" if p != p else ("< 0.001" if p < 0.001 else f"{p:.3f}")
            lines.append(f"| {worse} > {better} | {_ms(diffs, 2)} | {shown} | {_step_verdict(diffs, p)} |")
    return lines


def _low_data(rows: dict[str, list[dict]]) -> list[str]:
    present = [m for m in LOW_DATA_METHODS if any(f"mltd-lowdata-{m}-{n}" in rows for n in LOW_DATA_SIZES)]
    if not present:
        return []
    steps = {n: rs[0]["config"]["adapt_steps"] for n in LOW_DATA_SIZES for m in present
             if (rs := rows.get(f"mltd-lowdata-{m}-{n}"))}
    lines = ["", f"Low-data curve: test perplexity on the held-out domain `{LOW_DATA_DOMAIN}` after adaptation on "
             "n of its training sequences (mean ± std over seeds; TARP is the dynamic form, no meta-learning; "
             "Adam steps of --inner-batch sequences in brackets):", "",
             "| method | " + " | ".join(f"n = {n} ({steps.get(n, '?')} steps)" for n in LOW_DATA_SIZES) + " |",
             "|---|" + "---|" * len(LOW_DATA_SIZES)]
    for m in present:
        cells = [_ms([r["perplexity"][LOW_DATA_DOMAIN] for r in rows.get(f"mltd-lowdata-{m}-{n}", [])])
                 for n in LOW_DATA_SIZES]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "tarp" in present:
        lines += ["", "TARP − LoRA and TARP − full, paired by seed (negative: TARP better):", "",
                  "| n | TARP − LoRA | p | TARP − full | p |", "|---|---|---|---|---|"]
        for n in LOW_DATA_SIZES:
            cells = []
            for other in ("lora", "full"):
                a, b = rows.get(f"mltd-lowdata-tarp-{n}", []), rows.get(f"mltd-lowdata-{other}-{n}", [])
                a = [{**r, "mean_perplexity": r["perplexity"][LOW_DATA_DOMAIN]} for r in a]
                b = [{**r, "mean_perplexity": r["perplexity"][LOW_DATA_DOMAIN]} for r in b]
                diffs, p = _paired(a, b) if a and b else ([], float("nan"))
                cells += [_ms(diffs, 2), "–" if p != p else ("< 0.001" if p < 0.001 else f"{p:.3f}")]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def plot_low_data(path: Path, rows: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in LOW_DATA_METHODS:
        sizes = [n for n in LOW_DATA_SIZES if rows.get(f"mltd-lowdata-{m}-{n}")]
        means = [statistics.mean(r["perplexity"][LOW_DATA_DOMAIN] for r in rows[f"mltd-lowdata-{m}-{n}"])
                 for n in sizes]
        ax.plot(sizes, means, "o-", label=m)
    ax.set_xscale("log")
    ax.set_xlabel(f"training sequences of {LOW_DATA_DOMAIN}")
    ax.set_ylabel("test perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mltd_section(preset: str, rows: dict[str, list[dict]], report_dir: Path | None = None) -> list[str]:
    """RESULTS.md's MLtD section for one preset; `rows`: run name -> its result.json of every seed."""
    any_run = next(iter(rows.values()))[0]
    cfg = any_run["config"]
    lines = [f"## Meta-learning the difference (MLtD), `{preset}` preset", "",
             f"`jobs/mltd.py` (Hou, Salazar, Polovets, TACL 2022): LM `{Path(cfg['model']).name}`, TARP "
             f"`{cfg['tarp']}` rank {cfg['rank']}, {cfg['meta_steps']} meta-steps of {cfg['meta_batch']} tasks, "
             f"{cfg['inner_steps']} inner steps; every method then adapted {cfg['adapt_steps']} steps on each "
             f"held-out domain's {cfg['train_sequences']} training sequences of {cfg['context']} tokens. "
             f"Held-out rule: {any_run['held_out_rule']}. Test perplexity (lower is better), mean ± std over seeds.",
             ""]
    lines += _ordering(rows)
    lines += _low_data(rows)
    if report_dir is not None and any(n.startswith("mltd-lowdata-") for n in rows):
        plot = any_run["_log"].parent.parent / "mltd-low-data.png"
        plot_low_data(plot, rows)
        lines += ["", f"![low-data curve]({os.path.relpath(plot, report_dir)})"]
    return lines + [""]
