"""Write RESULTS.md from the result.json files that jobs leave in their output directories.

    python -m raydapt.results [--runs results] [--output RESULTS.md] [--bench results/bench]

Results are never typed by hand: every number in RESULTS.md is read from a result.json here, and
the README's Performance tables and autoscaling timings from the JSON figures in results/bench/
that bench/*.py and tests/test_autoscaling.py write.
Runs live in <runs>/<preset>/<name>-seed<N>/; each table row is one <name>, each cell the mean ±
std over its seeds. GDFO rows are compared with the BBT (pycma) runs of the same seeds: the API
calls each needed to reach BBT's final dev accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path

from raydapt.outputs import calls_to_reach, read_jsonl, write_json

__all__ = ["collect", "render", "main", "bench_output", "machine", "write_bench", "BENCH_DIR", "performance_block",
           "autoscaling_block"]

# bench/*.py and tests/test_autoscaling.py write their measured figures here (one JSON per bench).
BENCH_DIR = Path(__file__).resolve().parents[1] / "results" / "bench"


def bench_output(name: str) -> Path:
    """The default --output of bench/<name>.py."""
    return BENCH_DIR / f"{name}.json"


def machine(load_before: tuple[float, float, float]) -> dict:
    """Where a figure was measured: cores and the 1-minute load average at its start and end."""
    import os
    import platform
    return {"cpus": os.cpu_count(), "load_1min_before": round(load_before[0], 2),
            "load_1min_after": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "measured_at": _now()}


def _now() -> str:
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_bench(path: Path, figures: dict) -> None:
    """Write a bench's figures as JSON, whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, figures)
    print(f"wrote {path}")


def collect(runs: Path) -> list[dict]:
    results = []
    for path in sorted(runs.rglob("result.json")):
        result = json.loads(path.read_text())
        match = re.fullmatch(r"(.+)-seed(\d+)", path.parent.name)
        result["_name"] = match.group(1) if match else path.parent.name
        result["_preset"] = path.parent.parent.name
        result["_log"] = path.parent / "log.jsonl"
        results.append(result)
    return results


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _calls_to_reach(log: Path, target: float) -> int | None:
    return calls_to_reach(read_jsonl(log), target) if log.exists() else None


def _gdfo_table(rows: dict[str, list[dict]]) -> list[str]:
    """Per GDFO run: the calls it needed to reach BBT's final dev accuracy (same seed), and how far
    its student could be trusted (the injected points hinge on the student's rank agreement)."""
    bbt = {r["seed"]: r for r in rows.get("bbt-cma", [])}
    lines = []
    for name in sorted(n for n in rows if n.startswith("gdfo")):
        ratios, reached = [], 0
        for r in rows[name]:
            base = bbt.get(r["seed"])
            if base is None:
                continue
            target = base["dev_accuracy"]
            ours, theirs = _calls_to_reach(r["_log"], target), _calls_to_reach(base["_log"], target)
            if ours is not None and theirs:
                reached += 1
                ratios.append(ours / theirs)
        ratio = f"{statistics.mean(ratios):.2f}" if ratios else "–"
        loss_ratios = _train_loss_call_ratios(rows[name], bbt)
        loss_ratio = (f"{statistics.mean(loss_ratios):.2f} ({len(loss_ratios)}/{len(rows[name])})"
                      if loss_ratios else "–")
        agreement = _mean_std([r["student_agreement_mean"] for r in rows[name]], scale=1.0, digits=3)
        # --diagnose-gradient runs only: cos(student's gradient, teacher's true one) at the start points
        cosine = _mean_std([r["gradient_cosine_mean"] for r in rows[name]
                            if r.get("gradient_cosine_mean") is not None], scale=1.0, digits=3)
        injected = _mean_std([r["injected_points"] for r in rows[name]], scale=1.0, digits=1)
        # None: the gradient-only ablation, whose every winner is a gradient point by construction
        won = _mean_std([r["generations_won_by_gradient_points"] for r in rows[name]
                         if r.get("generations_won_by_gradient_points") is not None], scale=1.0, digits=1)
        lines.append(f"| {name} | {reached}/{len(rows[name])} | {ratio} | {loss_ratio} | {agreement} | {cosine} | {injected} "
                     f"| {won} | {_guided_wins(rows[name])} |")
    if not lines:
        return []
    return ["GDFO runs: API calls to reach BBT's (pycma, same seed) final dev accuracy, as a fraction of BBT's "
            "calls; the student's rank agreement with the teacher (Spearman rho per generation, mean) and the cosine "
            "between its gradient and the teacher's true one (per generation, mean; a random direction's mean |cos| "
            "is sqrt(2 / (pi d)): 0.08 at d = 100, 0.11 at d = 50); the gradient points the teacher scored, and the generations whose best point "
            "was one of them; with --guided-share, the share of generations whose best point was a guided sample "
            "(mean over seeds) beside guided samples / population (not the null: an antithetic pair's better half wins "
            "more often than a lone sample; the null is the same sampling along random directions, gdfo-guided-random):", "",
            "| run | seeds that reached it | mean calls ratio (run / BBT) | calls ratio to BBT's final train loss "
            "(seeds) | student rho | gradient cosine | gradient points | generations won by them "
            "| generations won by guided samples (guided share of population) |",
            "|---|---|---|---|---|---|---|---|---|",
            *lines, ""]


def _guided_wins(runs: list[dict]) -> str:
    guided = [r for r in runs if r.get("guided_points_per_generation")]
    if not guided:
        return "–"
    won = statistics.mean(r["generations_won_by_guided_points"] / r["generations"] for r in guided)
    share = statistics.mean(r["guided_points_per_generation"] / r["config"]["popsize"] for r in guided)
    return f"{won:.2f} ({share:.2f})"


def _train_loss_call_ratios(runs: list[dict], bbt: dict[int, dict]) -> list[float]:
    """Per seed: API calls to reach BBT's final best train loss (the searched objective, continuous,
    on the whole train set) over BBT's own calls to reach it. Less noisy than the dev accuracy of
    24-48 examples, which moves in steps of 2-4 points."""
    ratios = []
    for r in runs:
        base = bbt.get(r["seed"])
        if base is None or not r["_log"].exists() or not base["_log"].exists():
            continue
        target = base["best_train_loss"] if "best_train_loss" in base else None
        reach = [next((row["api_calls"] for row in read_jsonl(log) if row.get("best_train_loss", float("inf"))
                       <= target), None) for log in (r["_log"], base["_log"])] if target is not None else [None]
        if None not in reach and reach[1]:
            ratios.append(reach[0] / reach[1])
    return ratios


def _paired_vs_bbt(rows: dict[str, list[dict]]) -> list[str]:
    """Each run's test accuracy minus BBT's (pycma) on the same seed, same test set: mean ± std of the
    per-seed differences and scipy's paired t-test (two runs' accuracies on one test set share its
    sampling noise, so the paired difference is the comparison to read)."""
    from scipy import stats

    bbt = {r["seed"]: r["test_accuracy"] for r in rows.get("bbt-cma", [])}
    lines = []
    for name in sorted(n for n in rows if n != "bbt-cma"):
        pairs = [(r["test_accuracy"], bbt[r["seed"]]) for r in rows[name] if r.get("seed") in bbt]
        if len(pairs) < 2:
            continue
        diffs = [a - b for a, b in pairs]
        p = stats.ttest_rel(*zip(*pairs)).pvalue if statistics.stdev(diffs) > 0 else float("nan")
        lines.append(f"| {name} | {len(pairs)} | {_mean_std(diffs)} | {p:.2f} |")
    if not lines:
        return []
    return ["Test accuracy minus BBT's (pycma) on the same seed, in points (mean ± std over seeds; p: scipy's "
            "paired t-test):", "", "| run | seeds | − BBT (paired) | p |", "|---|---|---|---|", *lines, ""]


COMBLM_ROWS = ("large", "expert", "expert_untuned", "mean", "constant_scalar", "constant_vector", "entropy_scalar",
               "entropy_vector", "full_scalar", "full_vector", "proxy_tuning", "max_prob_oracle")


def _ppl(rs: list[dict], key: str, name: str) -> str:
    values = [r[key][name] for r in rs if name in r.get(key, {})]
    return _mean_std(values, scale=1.0) if values else "–"


def _comblm_section(preset: str, rows: dict[str, list[dict]]) -> list[str]:
    """Perplexity per model and combiner, fitted on target text alone and on a 50/50 general mix."""
    plain, mixed = rows.get("comblm", []), rows.get("comblm-mix50", [])
    if not plain:
        return []
    seeds = ", ".join(str(r["seed"]) for r in plain)
    lines = [f"## CombLM, `{preset}` preset", "",
             f"Test perplexity (seeds {seeds}). Target domain: the Python docs' topic pages; general: held-out "
             "stdlib source. `+untuned` rows mix in the small LM before fine-tuning (the paper's control).", "",
             "| model / combiner | target | general | target, fit mix 50/50 | general, fit mix 50/50 |",
             "|---|---|---|---|---|"]
    names = [*COMBLM_ROWS, *sorted(k for k in plain[0]["perplexity"] if k.endswith("+untuned"))]
    for name in names:
        lines.append(f"| {name} | {_ppl(plain, 'perplexity', name)} | {_ppl(plain, 'general_perplexity', name)} | "
                     f"{_ppl(mixed, 'perplexity', name)} | {_ppl(mixed, 'general_perplexity', name)} |")
    gains = [r["gain"]["relative_gain"]["entropy_scalar"] for r in plain if "entropy_scalar" in r["gain"]["relative_gain"]]
    beat = sum(bool(r["learned_combiners_beat_both_models"]) for r in plain)
    # A resumed run's timeline lacks the phases it kept; report one that ran every phase.
    complete = [r for r in plain + mixed if "expert_fine_tuning" in r["timeline"]["phases"]]
    timed = complete[0] if complete else plain[0]
    timeline = timed["timeline"]
    lines += ["", f"- Every learned combiner below both single models on the target test set: {beat}/{len(plain)} runs.",
              "- entropy_scalar vs each seed's best single model ("
              + ", ".join(f"{r['seed']}: {r['gain']['best_single_model']}" for r in plain) + "): "
              f"{_mean_std(gains, digits=1)}% lower perplexity (the paper: up to 9%); best combiner per seed: "
              + ", ".join(f"{r['seed']}: {r['gain']['best_combiner']} ({100 * r['gain']['best_combiner_gain']:.1f}%)"
                          for r in plain) + ".",
              f"- Parallelism ({timed['_name']}, seed {timed['seed']}): the phases sum to {timeline['sum_of_phases_s']:.0f} s of work "
              f"in {timeline['wall_time_s']:.0f} s of wall time ({timeline['speedup_from_overlap']:.2f}x): expert "
              "fine-tuning overlaps the black-box scoring, and the combiners fit concurrently.", ""]
    return lines


def _idpt_section(preset: str, rows: dict[str, list[dict]]) -> list[str]:
    """Per task: the hand-written prompt, one static prompt and ID-PT (exact match, mean ± std over
    seeds), and ID-PT minus static paired by seed."""
    idpt, static = rows.get("idpt", []), rows.get("idpt-static", [])
    if not idpt and not static:
        return []
    runs = idpt or static
    tasks = runs[0]["tasks"]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"## Input-dependent prompt tuning, `{preset}` preset", "",
             f"Test exact match in % on the built-in mix of {len(tasks)} tasks (seeds {seeds}; classification tasks: "
             "argmax among their label words), through the gray-box pipeline. The last column pairs the seeds.", "",
             "| task | kind | hand-written prompt | static prompt | ID-PT | ID-PT − static (paired) |",
             "|---|---|---|---|---|---|"]
    pairs = {r["seed"]: r for r in static}
    for task in [*tasks, "average"]:
        value = (lambda r: r["test_average"]) if task == "average" else (lambda r: r["test_exact_match"][task])  # noqa: E731
        manual = (lambda r: r["manual_prompt_test_average"]) if task == "average" else (  # noqa: E731
            lambda r: r["manual_prompt_test_exact_match"][task])
        diffs = [value(r) - value(pairs[r["seed"]]) for r in idpt if r["seed"] in pairs]
        kind = "" if task == "average" else runs[0]["kinds"][task]
        lines.append(f"| {task} | {kind} | {_mean_std([manual(r) for r in runs])} | {_mean_std([value(r) for r in static])} "
                     f"| {_mean_std([value(r) for r in idpt])} | {_mean_std(diffs) if diffs else '–'} |")
    steps = runs[0]["config"]["steps"]
    lines += ["", f"{steps} Adam steps of {runs[0]['config']['batch']} rows; trainable parameters: ID-PT "
              f"{idpt[0]['trainable_parameters'] if idpt else '–'}, static {static[0]['trainable_parameters'] if static else '–'}. "
              "A difference whose ± covers 0 is noise at these sizes (96 test rows per task).", ""]
    return lines


READER_RUNS = (("reader-closed_book", "closed book (question alone)"),
               ("reader-retriever", "BM25 top passages, packed in retrieval order"),
               ("reader-reranker", "the same passages re-ranked by the trained cross-encoder"),
               ("reader-white_box", "white-box reference: the small LM fine-tuned on the re-ranked rows"))


def _reader_recall(r: dict, k: str) -> float | None:
    packing = r["packing"]
    recall = packing.get("reranker", {}).get("test_recall") or packing.get("test_recall")
    return None if recall is None or k not in recall else recall[k]


def _reader_section(preset: str, rows: dict[str, list[dict]]) -> list[str]:
    """Frozen readers: test exact match of each input (mean ± std over seeds), what packing put in, and
    the paired differences the paper's ordering is about."""
    if not any(rows.get(name) for name, _ in READER_RUNS):
        return []
    lines = [f"## Frozen readers, `{preset}` preset", "",
             "Test exact match in % on the open-book task (question: a docstring summary; answer: the function's "
             "name), the frozen large LM reading through a soft prompt tuned by the gray-box pipeline; recall in % "
             "of the order passages are packed in; \"gold packed\": the share of questions whose gold passage "
             "made it into the reader's 256 positions.", "",
             "| input | seeds | test exact match | dev exact match | recall@1 | recall@5 | gold packed | passages "
             "packed | reader tokens | gray-box tokens served | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in READER_RUNS:
        rs = rows.get(name, [])
        if not rs:
            continue
        def values(key):
            return [v for v in (key(r) for r in rs) if v is not None]
        lines.append(f"| {label} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{_mean_std([r['test_exact_match'] for r in rs])} | {_mean_std([r['dev_exact_match'] for r in rs])} | "
                     f"{_mean_std(values(lambda r: _reader_recall(r, '1')))} | "
                     f"{_mean_std(values(lambda r: _reader_recall(r, '5')))} | "
                     f"{_mean_std(values(lambda r: r['packing'].get('test_gold_packed')))} | "
                     f"{_mean_std([r['packing']['test_mean_passages'] for r in rs], scale=1)} | "
                     f"{_mean_std([r['packing']['test_mean_tokens'] for r in rs], scale=1, digits=0)} | "
                     f"{_mean_std([r['oracle_usage']['forward_tokens'] for r in rs], scale=1, digits=0)} | "
                     f"{_mean_std([r['wall_time_s'] for r in rs], scale=1, digits=0)} |")
    lines += ["", "What the context costs: \"reader tokens\" is the mean length of a test row (soft prompt not counted), "
              "\"gray-box tokens served\" the forward tokens the frozen LM's stages served over the whole run "
              "(training and scoring; for the white-box reference, the tokens through the small LM itself), and a "
              "gray-box step's time grows with them. The re-ranker's recall is the same in the re-ranker and "
              "white-box rows: the same seed trains the same re-ranker.", "",
              "Paired by seed (a difference whose ± covers 0 is noise):", ""]
    for better, worse in (("reader-reranker", "reader-retriever"), ("reader-retriever", "reader-closed_book")):
        pairs = {r["seed"]: r for r in rows.get(worse, [])}
        diffs = [r["test_exact_match"] - pairs[r["seed"]]["test_exact_match"] for r in rows.get(better, [])
                 if r["seed"] in pairs]
        if diffs:
            lines.append(f"- {better} − {worse}: {_mean_std(diffs)} exact-match points ({len(diffs)} seeds)")
    return lines + [""]


RECURSIVE_RUNS = (("recursive-one", "one pass (its prompt trained for all the steps)"),
                  ("recursive-textual", "textual: pass 2 reads k sampled answers"),
                  ("recursive-neural", "neural: connector pre-trained on language modelling"),
                  ("recursive-neural-nopre", "neural, connector not pre-trained"),
                  ("recursive-neural-longpre", "neural, connector pre-trained for 300 steps"))


def _p_value(value: float) -> str:
    if value != value:  # NaN: nothing to test (one seed, equal differences, no discordant rows)
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _recursive_section(preset: str, rows: dict[str, list[dict]]) -> list[str]:
    """One pass vs textual and neural recursion (with and without the connector's pre-training):
    test exact match, the difference from one pass paired by seed (scipy's paired t-test), and each
    run's pass 2 against its own pass 1 on the same test rows (an exact McNemar test on the rows
    only one of them gets right, pooled over seeds)."""
    from scipy import stats

    present = [(name, label) for name, label in RECURSIVE_RUNS if rows.get(name)]
    if not present:
        return []
    any_run = rows[present[0][0]][0]
    one = {r["seed"]: r["test_exact_match"] for r in rows.get("recursive-one", [])}
    seeds = ", ".join(str(r["seed"]) for r in rows[present[0][0]])
    lines = [f"## Recursive LMs, `{preset}` preset", "",
             f"Test exact match in % on `{any_run['task']}` ({any_run['n_test']} test rows; seeds {seeds}), the "
             "frozen large LM run twice through the gray-box pipeline. Every run trains pass 1's prompt first with the "
             "same seed; one pass continues it for the steps pass 2 takes. Paired by seed: the difference from one "
             "pass and scipy's paired t-test; within each run: pass 2 against its own pass 1 on the same rows "
             "(right only after pass 2 / right only after pass 1, exact McNemar test, pooled over seeds).", "",
             "| run | test exact match | − one pass (paired) | p, paired t | pass 1 of the run | pass 2 vs pass 1: "
             "rows gained / lost | p, McNemar |", "|---|---|---|---|---|---|---|"]
    for name, label in present:
        rs = rows[name]
        diffs = [r["test_exact_match"] - one[r["seed"]] for r in rs if r["seed"] in one]
        paired = [(r["test_exact_match"], one[r["seed"]]) for r in rs if r["seed"] in one]
        p = stats.ttest_rel(*zip(*paired)).pvalue if len(paired) >= 2 and name != "recursive-one" else float("nan")
        gained = sum(a and not b for r in rs for a, b in zip(r["test_correct"], r["first_pass_test_correct"]))
        lost = sum(b and not a for r in rs for a, b in zip(r["test_correct"], r["first_pass_test_correct"]))
        mcnemar = stats.binomtest(gained, gained + lost).pvalue if gained + lost else float("nan")
        rows_changed = "–" if name == "recursive-one" else f"{gained} / {lost}"  # one pass has no pass 2
        lines.append(f"| {label} | {_mean_std([r['test_exact_match'] for r in rs])} | "
                     f"{_mean_std(diffs) if diffs and name != 'recursive-one' else '–'} | {_p_value(p)} | "
                     f"{_mean_std([r['first_pass_test_exact_match'] for r in rs])} | {rows_changed} | "
                     f"{_p_value(mcnemar)} |")
    cfg = any_run["config"]
    lines += ["", f"Pass 1: {cfg['steps']} Adam steps of {cfg['batch']} rows; pass 2: {cfg['second_steps']}; the "
              f"connector's pre-training: {cfg['pretrain_steps']} steps of {cfg['pretrain_batch']} windows of general "
              "text (the LM's own pre-training files)."]
    textual = rows.get("recursive-textual", [])
    if textual:
        lines.append(f"Textual, k = {textual[0]['config']['samples']} answers sampled at temperature "
                     f"{textual[0]['config']['temperature']}: one of them right "
                     f"{_mean_std([r['any_answer_test_exact_match'] for r in textual])}, their majority vote right "
                     f"{_mean_std([r['majority_vote_test_exact_match'] for r in textual])}.")
    losses = [f"{rows[name][0]['config']['pretrain_steps']} steps {_mean_std([r['connector_held_out_lm_loss'] for r in rows[name]], 1.0, 3)}"
              for name in ("recursive-neural", "recursive-neural-longpre") if rows.get(name)]
    if losses:
        lines.append("Neural: the pre-trained connector's held-out LM loss (pass 2 predicting a window's second half "
                     f"from its vectors alone), after {' and '.join(losses)}.")
    return lines + [""]


EXTEND_BASELINES = ("extend-full", "extend-full-lr5e-4", "extend-lora", "extend-adapter", "extend-neutral-no-l1",
                    "extend-neutral-sigmoid", "extend-neutral-he")
BACKBONE = "backbone (frozen, no extension)"


def _extend_point(r: dict) -> tuple[float, float]:
    """(forgetting axis, learning axis): original-domain eval loss and new-language test loss, nats/token."""
    return r["original_loss"], r["new_loss"]


def _backbone_point(r: dict) -> tuple[float, float]:
    return r["backbone_losses"]["original_eval"], r["backbone_losses"]["new_test"]


def extend_pareto(rows: dict[str, list[dict]], name: str = "extend-neutral") -> dict:
    """Whether run `name` is on the learning-vs-forgetting Pareto front (both losses lower is better).

    The points are every extend run and the frozen backbone. Per seed s: the runs of seed s and the
    backbone scored on seed s's evaluation blocks; `name` is on the front when no point has both losses
    <= its own and one < (`raydapt.extend.sweep.pareto_front`). On means: the same on each run's mean
    point over its seeds. Returns {"seeds": {s: (on_front, [dominating runs])}, "means": (on_front,
    [dominating runs]), "front": [runs on the front of the means]}.
    """
    from raydapt.extend.sweep import pareto_front

    def check(points: dict[str, tuple[float, float]]):
        names = list(points)
        front = [names[i] for i in pareto_front([points[n] for n in names])]
        x, y = points[name]
        dominators = [n for n, (u, v) in points.items() if n != name and u <= x and v <= y and (u < x or v < y)]
        return name in front, dominators, front

    per_seed = {}
    for seed in sorted({r["seed"] for r in rows.get(name, [])}):
        points = {n: _extend_point(r) for n, rs in rows.items() for r in rs if r["seed"] == seed}
        points[BACKBONE] = _backbone_point(next(r for r in rows[name] if r["seed"] == seed))
        per_seed[seed] = check(points)[:2]
    means = {n: tuple(statistics.mean(axis) for axis in zip(*map(_extend_point, rs))) for n, rs in rows.items()}
    means[BACKBONE] = tuple(statistics.mean(axis) for axis in zip(*map(_backbone_point, rows[name])))
    on, dominators, front = check(means)
    return {"seeds": per_seed, "means": (on, dominators), "front": front}


def _extend_backbone(rows: dict[str, list[dict]]) -> dict[int, dict]:
    """The frozen backbone's losses per seed (each run scores it on its seed's evaluation blocks)."""
    return {r["seed"]: r["backbone_losses"] for rs in rows.values() for r in rs}


def _extend_table(rows: dict[str, list[dict]]) -> list[str]:
    base = _extend_backbone(rows)
    loss = lambda values: _mean_std(values, scale=1.0, digits=3)  # noqa: E731
    lines = ["| run | method | lr | seeds | trainable parameters | new-language loss | original-domain loss | "
             "forgetting (− backbone, paired) | gate: original eval | gate: original mix | gate: new language |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {BACKBONE} | – | – | {', '.join(map(str, sorted(base)))} | 0 | "
             f"{loss([b['new_test'] for b in base.values()])} | {loss([b['original_eval'] for b in base.values()])} "
             "| – | – | – | – |"]
    for name in sorted(rows, key=lambda n: (n != "extend-neutral", n)):
        rs = sorted(rows[name], key=lambda r: r["seed"])
        gates = {k: [r["gate_mean"][k] for r in rs if r["gate_mean"].get(k) is not None]
                 for k in ("original", "original_mix", "new")}
        lrs = "/".join(f"{lr:g}" for lr in sorted({r["lr"] for r in rs}))
        lines.append(f"| {name} | {rs[0]['method']} | {lrs} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{rs[0]['trainable_parameters']:,} | {loss([r['new_loss'] for r in rs])} | "
                     f"{loss([r['original_loss'] for r in rs])} | "
                     f"{loss([r['original_loss'] - base[r['seed']]['original_eval'] for r in rs])} | "
                     + " | ".join(loss(gates[k]) if gates[k] else "–" for k in ("original", "original_mix", "new"))
                     + " |")
    return lines


def _verdict(diffs: list[float], p: float, lower: str, higher: str) -> str:
    """A paired difference named only when scipy's t-test puts it outside the noise (p < 0.05)."""
    if p != p:
        return "not tested (one seed or no spread)"
    if p >= 0.05:
        return "no difference beyond the noise"
    return lower if statistics.mean(diffs) < 0 else higher


def _extend_pairs(rows: dict[str, list[dict]]) -> list[str]:
    """Neutral residues minus each other run, paired by seed, on both axes (scipy's paired t-test)."""
    from scipy import stats

    ours = {r["seed"]: r for r in rows.get("extend-neutral", [])}
    lines = ["| neutral residues − run | new-language loss (paired) | p | learning | original-domain loss (paired) "
             "| p | forgetting |", "|---|---|---|---|---|---|---|"]
    for name in [*EXTEND_BASELINES, *sorted(set(rows) - set(EXTEND_BASELINES) - {"extend-neutral"})]:
        pairs = [(ours[r["seed"]], r) for r in rows.get(name, []) if r["seed"] in ours]
        if not pairs:
            continue
        cells = []
        for key, lower, higher in (("new_loss", "neutral learns more", "neutral learns less"),
                                   ("original_loss", "neutral forgets less", "neutral forgets more")):
            diffs = [a[key] - b[key] for a, b in pairs]
            p = stats.ttest_rel([a[key] for a, _ in pairs], [b[key] for _, b in pairs]).pvalue \
                if len(pairs) >= 2 else float("nan")
            cells += [_mean_std(diffs, scale=1.0, digits=3), _p_value(p), _verdict(diffs, p, lower, higher)]
        lines.append(f"| {name} ({len(pairs)} seeds) | " + " | ".join(cells) + " |")
    return lines


def _plot_extend(path: Path, preset: str, rows: dict[str, list[dict]], front: list[str]) -> None:
    """Learning vs forgetting: each run's mean point with its seeds' std as error bars, the backbone,
    and the Pareto front of the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {BACKBONE: list(map(_backbone_point, next(iter(rows.values()))))}
    points.update({n: list(map(_extend_point, rs)) for n, rs in sorted(rows.items())})
    fig, ax = plt.subplots(figsize=(8, 5.5))
    means = {}
    for i, (name, pts) in enumerate(points.items()):
        xs, ys = zip(*pts)
        means[name] = (statistics.mean(xs), statistics.mean(ys))
        err = (statistics.stdev(xs), statistics.stdev(ys)) if len(pts) > 1 else (0.0, 0.0)
        style = {"marker": "*", "markersize": 14} if name == "extend-neutral" else {
            "marker": "s" if name == BACKBONE else "o", "markersize": 7}
        ax.errorbar(*means[name], xerr=err[0], yerr=err[1], capsize=3, linestyle="none", color=f"C{i}",
                    label=name.removeprefix("extend-"), **style)
    fx, fy = zip(*sorted(means[n] for n in front))
    ax.plot(fx, fy, "k--", lw=0.8, label="Pareto front (means)")
    ax.set_xlabel("original-domain loss (forgetting axis, nats/token; lower is better)")
    ax.set_ylabel("new-language loss (learning axis, nats/token; lower is better)")
    seeds = sorted({r["seed"] for rs in rows.values() for r in rs})
    ax.set_title(f"Neutral residues and baselines, `{preset}` preset, seeds {', '.join(map(str, seeds))} (mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _extend_section(preset: str, rows: dict[str, list[dict]], report_dir: Path | None) -> list[str]:
    """Neutral residues (Signe Talla, Grave, Jegou, ICML 2025) against its ablations and baselines on
    both axes, the Pareto check, the gate per domain, and the trade-off plot (written beside the runs)."""
    if not rows:
        return []
    any_run = next(iter(rows.values()))[0]
    cfg = any_run["config"]
    lines = [f"## Neutral residues: a new language in the frozen LM, `{preset}` preset", "",
             f"Learning: next-token loss (nats/token) on the new language's test blocks (French gettext messages). "
             "Forgetting: loss on original-domain text never mixed into training (the source of installed "
             f"third-party packages). {cfg['steps']} AdamW steps of {cfg['batch']} blocks of {cfg['context']} tokens, "
             f"{cfg['original_fraction']:g} of them original-domain; {cfg['workers']} Ray Train workers; "
             f"{cfg['eval_blocks']} blocks per evaluation set. Mean ± std over seeds; forgetting is each run's "
             "original-domain loss minus the backbone's on the blocks that run scored. The gate columns are the mean "
             "block gate g(x) over tokens of each set (ReLU gates are unbounded; the sigmoid gate is in (0, 1)).", ""]
    lines += _extend_table(rows)
    if "extend-neutral" not in rows:
        return lines + [""]
    pareto = extend_pareto(rows)
    on_seeds = [s for s, (on, _) in pareto["seeds"].items() if on]
    beaten = {s: d for s, (on, d) in pareto["seeds"].items() if not on}
    on_means, dominators = pareto["means"]
    lines += ["", "Neutral residues minus each run, paired by seed (scipy's paired t-test; a difference with p >= 0.05 "
              "is called noise, whatever its sign):", "", *_extend_pairs(rows), "",
              "Pareto front (both losses lower is better; a point is on it when no other point has both losses <= "
              "its own and one <), over every run and the backbone:",
              f"- per seed: neutral residues is on the front in {len(on_seeds)}/{len(pareto['seeds'])} seeds"
              + (" (dominated on " + "; ".join(f"seed {s} by {', '.join(d)}" for s, d in beaten.items()) + ")"
                 if beaten else "") + ";",
              "- on the means over seeds: "
              + ("on the front" if on_means else "not on the front, dominated by " + ", ".join(dominators)) + "; "
              f"the front of the means, by forgetting: {', '.join(pareto['front'])}."]
    gates = [r["gate_mean"] for r in rows["extend-neutral"] if r["gate_mean"].get("new")]
    if gates:
        lines.append(f"- neutral residues' mean gate: {_mean_std([g['original'] for g in gates], 1.0, 3)} on "
                     f"original-domain eval tokens, {_mean_std([g['new'] for g in gates], 1.0, 3)} on new-language tokens, ratio "
                     f"{_mean_std([g['original'] / g['new'] for g in gates], 1.0, 2)} (the paper's mechanism: about "
                     "0 on the original domain).")
    if report_dir is not None:
        plot = any_run["_log"].parent.parent / "extend-tradeoff.png"
        _plot_extend(plot, preset, rows, pareto["front"])
        lines += ["", f"![learning vs forgetting]({os.path.relpath(plot, report_dir)})"]
    return lines + [""]


def render(results: list[dict], report_dir: Path | None = None) -> str:
    """RESULTS.md's text. With `report_dir` (where RESULTS.md goes), the plots it links are written beside
    the runs and linked relative to it; without, no plot is written or linked."""
    presets: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    comblm: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    idpt: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    recursive: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    extend: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    mltd: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    reader: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        group = (comblm if r.get("method") == "comblm" else idpt if r["_name"].startswith("idpt")
                 else recursive if r["_name"].startswith("recursive") else extend if r["_name"].startswith("extend")
                 else mltd if r["_name"].startswith("mltd") else reader if r["_name"].startswith("reader")
                 else presets)
        group[r["_preset"]][r["_name"]].append(r)
    lines = ["# Results", "", "Generated by `python -m raydapt.results` (run by `python jobs/suite.py`) from the "
             "`result.json` files under `results/`; do not edit by hand. Accuracies in %, mean ± std over seeds.", ""]
    for preset, rows in sorted(presets.items()):
        lines += [f"## Default task, `{preset}` preset", "",
                  "| run | method | optimizer | seeds | API calls | manual prompt test acc | dev acc | test acc |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rs in sorted(rows.items()):
            seeds = sorted(r.get("seed") for r in rs)
            calls = sorted({r.get("api_calls", 0) for r in rs})
            lines.append(
                f"| {name} | {rs[0].get('method', '?')} | {rs[0].get('optimizer', '-')} | "
                f"{', '.join(map(str, seeds))} | {'/'.join(map(str, calls))} | "
                f"{_mean_std([r['manual_prompt_test_accuracy'] for r in rs if 'manual_prompt_test_accuracy' in r])} | "
                f"{_mean_std([r['dev_accuracy'] for r in rs if 'dev_accuracy' in r])} | "
                f"{_mean_std([r['test_accuracy'] for r in rs])} |")
        lines.append("")
        lines += _paired_vs_bbt(rows)
        lines += _gdfo_table(rows)
    for preset, rows in sorted(comblm.items()):
        lines += _comblm_section(preset, rows)
    for preset, rows in sorted(idpt.items()):
        lines += _idpt_section(preset, rows)
    for preset, rows in sorted(recursive.items()):
        lines += _recursive_section(preset, rows)
    for preset, rows in sorted(extend.items()):
        lines += _extend_section(preset, rows, report_dir)
    for preset, rows in sorted(mltd.items()):
        from raydapt.mltd.report import mltd_section
        lines += mltd_section(preset, rows, report_dir)
    for preset, rows in sorted(reader.items()):
        lines += _reader_section(preset, rows)
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
PERFORMANCE = ("<!-- performance:begin -->", "<!-- performance:end -->")
AUTOSCALING = ("<!-- autoscaling:begin -->", "<!-- autoscaling:end -->")


def readme_block(results: list[dict]) -> str:
    """The headline numbers for the README: manual vs. tuned prompts on the default task."""
    rows = defaultdict(list)
    extend = [r for r in results if r["_name"].startswith("extend")]
    results = [r for r in results
               if r.get("method") != "comblm"
               and not r["_name"].startswith(("idpt", "recursive", "extend", "mltd", "reader"))]
    for r in results:
        rows[(r["_preset"], r["_name"])].append(r)
    lines = []
    for preset in sorted({r["_preset"] for r in results}):
        picked = {name: rs for (p, name), rs in rows.items() if p == preset}
        if not picked:
            continue
        any_run = next(iter(picked.values()))
        manual = _mean_std([r["manual_prompt_test_accuracy"] for r in any_run if "manual_prompt_test_accuracy" in r])
        lines.append(f"Default task, `{preset}` preset, test accuracy in % (mean ± std over {len(any_run)} seeds), "
                     f"hand-written prompt: {manual}")
        for name, label in (("gradient-white-box", "prompt tuned by gradients through the white box"),
                            ("bbt-cma", "BBT (pycma)"), ("bbt-lq-cma", "BBT with lq-CMA-ES (pycma's surrogate)"),
                            ("bbtv2-cma", "BBTv2 (pycma)"), ("gdfo", "GDFO")):
            if name in picked:
                lines.append(f"- {label}: {_mean_std([r['test_accuracy'] for r in picked[name]])}")
        lines.append("")
    return "\n".join(lines + _extend_headline(extend))


def _extend_headline(results: list[dict]) -> list[str]:
    """Neutral residues' two losses against the backbone's, and its place on the Pareto front of the means."""
    lines = []
    for preset in sorted({r["_preset"] for r in results}):
        rows = defaultdict(list)
        for r in results:
            if r["_preset"] == preset:
                rows[r["_name"]].append(r)
        ours = rows.get("extend-neutral")
        if not ours:
            continue
        on_front, dominators = extend_pareto(rows)["means"]
        loss = lambda values: _mean_std(values, scale=1.0, digits=3)  # noqa: E731
        lines += [f"Neutral residues, `{preset}` preset (nats/token, mean ± std over {len(ours)} seeds): new-language "
                  f"loss {loss([r['new_loss'] for r in ours])} (backbone "
                  f"{loss([r['backbone_losses']['new_test'] for r in ours])}), original-domain loss "
                  f"{loss([r['original_loss'] for r in ours])} (backbone "
                  f"{loss([r['backbone_losses']['original_eval'] for r in ours])}); on the Pareto front of the "
                  "methods' means: " + ("yes" if on_front else "no, dominated by " + ", ".join(dominators)) + ".", ""]
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _where(fig: dict) -> str:
    m = fig["machine"]
    return (f"measured {m['measured_at']} on {m['cpus']} CPUs, 1-minute load {m['load_1min_before']} before and "
            f"{m['load_1min_after']} after")


def _oracle_table(fig: dict) -> list[str]:
    lines = [f"`python bench/oracle.py` (populations of {fig['population']} prompts on {fig['examples']} examples, add "
             f"mode, micro-batches of {fig['micro_batch']}; medians of {fig['repeats']}; {_where(fig)}; "
             f"`uptime` at the start: {fig.get('uptime_before', 'not recorded')}):", ""]
    if "limit" in fig:
        lines += _oracle_limit(fig)
    if "scaling" in fig:
        lines += _oracle_scaling(fig["scaling"])
    return lines


def _oracle_limit(fig: dict) -> list[str]:
    """Achieved FLOP/s against the measured matmul peak, and the ratios issue 18 asks for, per L."""
    peak, limit = fig["peak"], fig["limit"]
    lengths = list(limit)
    cases = (("shared", "the population in one request, prompt prefix shared"),
             ("unshared", "the population in one request, every row runs the prefix"),
             ("one_by_one", "one candidate per request (BBT's reference code), unshared"))
    lines = [f"fp32 matmul peak at the model's own shapes, timed in the same run: {peak['flops_per_s'] / 1e9:.1f} "
             f"GFLOP/s on 1 torch thread ({fig['peak_after'] / 1e9:.1f} after the cases; "
             f"{peak['all_threads_flops_per_s'] / 1e9:.1f} on {peak['all_threads']} threads). In process runs on 1 "
             f"thread and each stage actor on 1, so a case's limit is 1 or 2 x the 1-thread peak. FLOPs are counted "
             f"on the real tokens each case computes, attention included, padding not.", "",
             "| L | request | in process | of peak | 2-stage Ray pipeline | of peak |", "|---|---|---|---|---|---|"]
    for length in lengths:
        rows = limit[length]["cases"]
        for key, name in cases:
            a, b = rows[f"in_process_{key}"], rows[f"pipeline_{key}"]
            lines.append(f"| {length} | {name} | {_ms(a['median_s'])} | {a['fraction_of_peak']:.0%} | "
                         f"{_ms(b['median_s'])} | {b['fraction_of_peak']:.0%} |")
    header = " | ".join(f"L = {length}" for length in lengths)
    lines += ["", f"| measure | {header} | goal |", "|---|" + "---|" * len(lengths) + "---|"]
    measures = (("one_by_one_over_shared_in_process", "one candidate per request / the population batched with "
                 "a shared prefix, in process", ">= 3x at L = 50"),
                ("one_by_one_over_shared_pipeline", "the same through the pipeline", ""),
                ("one_by_one_over_unshared_in_process", "one candidate per request / batched without sharing, "
                 "in process (before issue 18)", ""),
                ("unshared_over_shared_in_process", "batched: unshared / shared, in process", ""),
                ("unshared_over_shared_pipeline", "the same through the pipeline", ""),
                ("pipeline_over_in_process_shared", "2-stage pipeline / in process, shared", ""))
    for key, name, goal in measures:
        values = " | ".join(f"{limit[length]['ratios'][key]:.2f}x" for length in lengths)
        lines.append(f"| {name} | {values} | {goal} |")
    work = " | ".join(f"{limit[length]['shared_work_fraction']:.2f}" for length in lengths)
    lines += [f"| FLOPs of the shared request / the unshared one | {work} | |", ""]
    return lines


def _oracle_scaling(rows: dict) -> list[str]:
    lines = ["Time per request as each size doubles from the default request (Ray stage actors, prefix "
             "sharing on):", "", "| request | P | N | L | S | time | / default |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name.replace('_x2', ' x 2').replace('_', ' ')} | {r['population']} | {r['examples']} | "
                     f"{r['prompt_length']} | {r['stages']} | {_ms(r['median_s'])} | {r['ratio']:.2f}x |")
    return lines + [""]


def _search_table(fig: dict) -> list[str]:
    a, b = fig["coordinator"], fig["replicas"]
    m = b["median_s"]
    return [f"`python bench/search.py` (BBT's default config through a 1 x 1 Ray pipeline; {a['generations']} "
            f"generations; {_where(fig)}):", "",
            "| measure | ratio | goal |", "|---|---|---|",
            f"| coordinator's own time (ask, tell, bookkeeping, checkpoint) / oracle time per generation, median | "
            f"{a['coordinator_over_oracle']:.2%} ({a['median_coordinator_s'] * 1000:.1f} ms vs "
            f"{_ms(a['median_oracle_s'])}) | < 5% |",
            f"| population over 2 replicas vs 1, SIMULATED latency of {b['latency_ms']:g} ms per micro-batch "
            f"(`PoolSpec.simulated_latency_ms`, a benchmark-only option) | {b['speedup_latency']:.2f}x faster "
            f"({_ms(m['latency_r2'])} vs {_ms(m['latency_r1'])}) | >= 1.6x |",
            f"| the same without simulated latency (compute only) | {b['speedup_no_latency']:.2f}x | |", "",
            f"Answers bitwise identical over 1 and 2 replicas, with and without the delay: {b['identical']}.", ""]


def _graybox_table(fig: dict) -> list[str]:
    med, r, n = fig["median_s"], fig["ratios"], fig["sizes"]
    return [f"`python bench/graybox.py` (a gray-box training step: {n['rows']} rows of "
            f"{'random token ids' if fig['synthetic'] else 'the default task'}, "
            f"{n['prompt_length']} prompt vectors each, LM loss on every token, forward then backward to the "
            f"prompt in micro-batches of {n['micro_batch']}; medians of {n['repeats']}; {_where(fig)}):", "",
            "| measure | ratio | goal |", "|---|---|---|",
            f"| (a) 2-stage Ray pipeline / the same step in one process ({fig['in_process_threads']} torch threads) | "
            f"{r['pipeline_vs_in_process']:.2f}x ({_ms(med['pipeline_keep'])} vs {_ms(med['in_process'])}) | <= 1.2x |",
            f"| (a) the same / in one process on 1 thread | {r['pipeline_vs_in_process_1_thread']:.2f}x "
            f"({_ms(med['pipeline_keep'])} vs {_ms(med['in_process_1_thread'])}) | |",
            f"| (b) 2 replicas vs 1 (1 stage each, 1 CPU per stage) | {r['speedup_2_replicas']:.2f}x faster "
            f"({_ms(med['replicas_2'])} vs {_ms(med['replicas_1'])}) | |",
            f"| (c) 2-stage pipeline, graphs rebuilt at backward (`recompute`) / kept | {r['recompute_over_keep']:.2f}x "
            f"({_ms(med['pipeline_recompute'])} vs {_ms(med['pipeline_keep'])}) | |", "",
            f"Prompt gradients bitwise identical in every case and repeat: {fig['identical']}.", ""]


def _combiner_table(fig: dict) -> list[str]:
    return [f"`python bench/combiners.py` ({fig['combiners']} CombLM combiners on {fig['fit_tokens']} fit tokens, "
            f"vocabulary {fig['vocab']}, {fig['epochs']} epochs; medians of {fig['repeats']}; {_where(fig)}):", "",
            "| measure | ratio |", "|---|---|",
            f"| one Ray Train run of {fig['train_workers']} workers (what jobs/comblm.py does) / one Ray task per "
            f"combiner | {fig['train_over_tasks']:.2f}x ({fig['train_run_s']:.1f} s vs {fig['tasks_s']:.1f} s) |", "",
            f"Combiner states bitwise identical both ways: {fig['bit_identical']}.", ""]


EXTEND_ORDER = ("neutral", "neutral-no-l1", "neutral-sigmoid", "neutral-he", "adapter", "lora", "full")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _extend_bench_table(fig: dict) -> list[str]:
    """bench/extend.py: parameters and counted peak memory per method, tokens/s on 1 and 2 Ray Train workers."""
    n, speed = fig["sizes"], fig["speed"]
    lines = [f"`python bench/extend.py` (jobs/extend.py's training step on {n['batch']} blocks of {n['context']} "
             f"tokens, backbone of {fig['backbone_parameters']:,} parameters; memory counted from the tensors one "
             f"step holds: weights, gradients, AdamW state, activations saved for backward; 1 and 2 Ray Train "
             f"workers timed step by step in turn in one run, 1 thread each, medians of {n['steps']}; {_where(fig)}):",
             "", "| method | trainable parameters | of the backbone | peak training memory (counted) | / full "
             "fine-tuning | saved activations | tokens/s, 1 worker | 2 workers | 2 / 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(fig["methods"], key=lambda m: EXTEND_ORDER.index(m) if m in EXTEND_ORDER else len(EXTEND_ORDER)):
        c, s = fig["methods"][name], speed.get(name)
        over = f"{c['memory_over_full']:.2f}x" if c.get("memory_over_full") else ""
        rate = (f"{s['tokens_per_s']['1']:.0f} | {s['tokens_per_s']['2']:.0f} | {s['speedup_2_workers']:.2f}x"
                if s else " | | ")
        lines.append(f"| {name} | {c['trainable_parameters']:,} | {c['trainable_fraction']:.1%} | "
                     f"{_mib(c['memory_bytes']['total'])} | {over} | {_mib(c['memory_bytes']['activations'])} | {rate} |")
    return lines + [""]


def _retrieval_table(fig: dict) -> list[str]:
    """bench/retrieval.py: the BM25 index vs a brute-force scan, and the index's recall@k."""
    ks = sorted(fig["recall"]["test"], key=int)
    return [f"`python bench/retrieval.py` (the open-book task's bm25s index over {fig['passages']:,} passages, top "
            f"{fig['k']} for {fig['questions']} questions, vs a brute-force BM25 scan of the same corpus on "
            f"{fig['scan_queries']} of them; {_where(fig)}):", "",
            "| measure | value |", "|---|---|",
            f"| index / scan, queries per second | {fig['speedup']:.1f}x ({fig['index_qps']:.0f} vs "
            f"{fig['scan_qps']:.1f} q/s) |",
            f"| index build, load | {fig['build_s']:.2f} s, {fig['load_s']:.3f} s |",
            f"| top-1 the scan's best / largest top-{fig['k']} score gap | {fig['top1_agrees_with_scan']:.3f} / "
            f"{fig['max_top_k_score_gap']:.1e} |", "",
            "| split | " + " | ".join(f"recall@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks),
            *[f"| {split} | " + " | ".join(f"{fig['recall'][split][k]:.3f}" for k in ks) + " |"
              for split in ("train", "dev", "test") if split in fig["recall"]], ""]


def performance_block(bench_dir: Path) -> str:
    """The README's Performance tables, from the figures bench/*.py wrote (a bench not run: no table)."""
    lines = []
    for name, table in (("oracle", _oracle_table), ("search", _search_table), ("graybox", _graybox_table),
                        ("combiners", _combiner_table), ("extend", _extend_bench_table),
                        ("retrieval", _retrieval_table)):
        path = Path(bench_dir) / f"{name}.json"
        if path.exists():
            lines += table(json.loads(path.read_text()))
    return "\n".join(lines)


def autoscaling_block(bench_dir: Path) -> str:
    """tests/test_autoscaling.py's timings, as the sentence the README's cluster section carries."""
    path = Path(bench_dir) / "autoscaling.json"
    if not path.exists():
        return ""
    fig = json.loads(path.read_text())
    return (f"A 2-stage pool on a head with no CPU made the autoscaler add two worker nodes in "
            f"{fig['nodes_up_s']:.1f} s (the pool answered {fig['add_s']:.1f} s after it was asked for), the stages "
            f"answered bitwise equal to an in-process pool ({fig['forward_equal']}), and {fig['remove_s']:.1f} s after "
            f"the pool was released both nodes were removed as idle ({fig['idle_timeout_s']} s idle timeout; "
            f"{_where(fig)}).\n")


def update_readme(readme: Path, block: str, markers: tuple[str, str] = (README_BEGIN, README_END)) -> None:
    """Replace what lies between `markers` in the README with `block` (nothing when a marker is missing)."""
    if not readme.exists():
        return
    begin, end = markers
    text = readme.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        readme.write_text(f"{head}{begin}\n{block}{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("results"), help="directory searched for result.json files")
    parser.add_argument("--output", type=Path, default=Path("RESULTS.md"))
    parser.add_argument("--bench", type=Path, default=BENCH_DIR, help="directory of bench/*.py's figures")
    args = parser.parse_args(argv)
    results = collect(args.runs)
    if not results:
        raise SystemExit(f"error: no result.json under {args.runs}")
    args.output.write_text(render(results, args.output.parent))
    readme = args.output.with_name("README.md")
    update_readme(readme, readme_block(results))
    update_readme(readme, performance_block(args.bench), PERFORMANCE)
    update_readme(readme, autoscaling_block(args.bench), AUTOSCALING)
    print(f"wrote {args.output} (and README.md's results, performance and autoscaling blocks) from "
          f"{len(results)} runs and {args.bench}")


if __name__ == "__main__":
    main()
