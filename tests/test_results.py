"""RESULTS.md is rendered from result.json files alone: known inputs give known tables."""
from __future__ import annotations

import json

from raydapt.results import collect, main, readme_block, render


def write_run(root, preset, name, seed, result, log=()):
    out = root / preset / f"{name}-seed{seed}"
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({"seed": seed, **result}))
    (out / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))


def bbt(acc, dev):
    return {"method": "bbt", "optimizer": "cma", "api_calls": 100, "manual_prompt_test_accuracy": 0.5,
            "dev_accuracy": dev, "test_accuracy": acc}


def gdfo(acc, dev, rho, injected, won):
    return bbt(acc, dev) | {"method": "gdfo", "student_agreement_mean": rho, "injected_points": injected,
                            "generations_won_by_gradient_points": won}


def test_tables_from_known_results(tmp_path):
    runs = tmp_path / "results"
    # BBT reaches its final dev accuracy 0.6 at 80 calls; GDFO reaches it at 40 on seed 1 and never on seed 2
    write_run(runs, "quick", "bbt-cma", 1, bbt(0.6, 0.6), [{"api_calls": 40, "dev_accuracy": 0.5},
                                                           {"api_calls": 80, "dev_accuracy": 0.6}])
    write_run(runs, "quick", "bbt-cma", 2, bbt(0.7, 0.6), [{"api_calls": 80, "dev_accuracy": 0.6}])
    write_run(runs, "quick", "gdfo", 1, gdfo(0.7, 0.7, 0.1, 10, 1) | {"gradient_cosine_mean": 0.3}, [{"api_calls": 40, "dev_accuracy": 0.7}])
    write_run(runs, "quick", "gdfo", 2, gdfo(0.5, 0.5, 0.3, 20, 3), [{"api_calls": 40, "dev_accuracy": 0.5}])
    # guided samples won 6 of 10 and 3 of 10 generations, 4 of a population of 10 each time
    guided = {"generations": 10, "guided_points_per_generation": 4, "config": {"popsize": 10}}
    for seed, won in ((1, 6), (2, 3)):
        write_run(runs, "quick", "gdfo-guided", seed, gdfo(0.6, 0.6, 0.1, 0, 0) | guided
                  | {"generations_won_by_guided_points": won})
    text = render(collect(runs))
    assert "| bbt-cma | bbt | cma | 1, 2 | 100 | 50.00 ± 0.00 | 60.00 ± 0.00 | 65.00 ± 7.07 |" in text
    # the cosine: over the runs that measured it (--diagnose-gradient)
    assert "| gdfo | 1/2 | 0.50 | – | 0.200 ± 0.141 | 0.300 | 15.0 ± 7.1 | 2.0 ± 1.4 | – |" in text
    assert "| 0.0 ± 0.0 | 0.45 (0.40) |" in text
    # paired by seed: 70 - 60 and 50 - 70 points; t = -0.05 / (0.2121 / sqrt 2), 1 df: p = 0.80
    assert "| gdfo | 2 | -5.00 ± 21.21 | 0.80 |" in text
    block = readme_block(collect(runs))
    assert "- BBT (pycma): 65.00 ± 7.07" in block and "- GDFO: 60.00 ± 14.14" in block


def test_calls_to_reach_bbts_final_train_loss(tmp_path):
    runs = tmp_path / "results"
    # BBT's final best train loss 0.5 first at 80 calls; GDFO seed 1 reaches it at 40, seed 2 at 120
    for seed in (1, 2):
        write_run(runs, "quick", "bbt-cma", seed, bbt(0.6, 0.6) | {"best_train_loss": 0.5},
                  [{"api_calls": 40, "best_train_loss": 0.7}, {"api_calls": 80, "best_train_loss": 0.5}])
    write_run(runs, "quick", "gdfo", 1, gdfo(0.6, 0.6, 0.1, 1, 0), [{"api_calls": 40, "best_train_loss": 0.4}])
    write_run(runs, "quick", "gdfo", 2, gdfo(0.6, 0.6, 0.1, 1, 0), [{"api_calls": 40, "best_train_loss": 0.6},
                                                                   {"api_calls": 120, "best_train_loss": 0.5}])
    assert "| gdfo | 0/2 | – | 1.00 (2/2) |" in render(collect(runs))  # (0.5 + 1.5) / 2


def test_main_writes_results_and_the_readme_block(tmp_path):
    runs = tmp_path / "results"
    write_run(runs, "quick", "bbt-cma", 1, bbt(0.6, 0.6))
    (tmp_path / "README.md").write_text("top\n<!-- results:begin -->\nold\n<!-- results:end -->\nbottom\n")
    main(["--runs", str(runs), "--output", str(tmp_path / "RESULTS.md")])
    assert "| bbt-cma | bbt | cma | 1 | 100 | 50.00 | 60.00 | 60.00 |" in (tmp_path / "RESULTS.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and "- BBT (pycma): 60.00" in readme and readme.endswith("bottom\n")


def _machine():
    return {"cpus": 2, "load_1min_before": 1.5, "load_1min_after": 2.0, "platform": "x", "measured_at": "T"}


def test_performance_and_autoscaling_blocks_from_known_figures(tmp_path):
    from raydapt.results import AUTOSCALING, PERFORMANCE, autoscaling_block, performance_block
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "combiners.json").write_text(json.dumps({
        "combiners": 12, "fit_tokens": 100, "vocab": 64, "epochs": 2, "repeats": 2, "train_workers": 2,
        "train_run_s": 30.0, "tasks_s": 20.0, "train_over_tasks": 1.5, "bit_identical": True, "machine": _machine()}))
    (bench / "autoscaling.json").write_text(json.dumps({
        "nodes_up_s": 5.25, "add_s": 7.0, "remove_s": 12.5, "forward_equal": True, "idle_timeout_s": 12,
        "machine": _machine()}))
    perf = performance_block(bench)
    assert "| one Ray Train run of 2 workers (what jobs/comblm.py does) / one Ray task per combiner | 1.50x " \
           "(30.0 s vs 20.0 s) |" in perf
    assert "bench/oracle.py" not in perf  # a bench that was not run gets no table
    scaling = autoscaling_block(bench)
    assert "two worker nodes in 5.2 s" in scaling and "12.5 s after" in scaling
    # main() fills the README's markers from --bench.
    (tmp_path / "README.md").write_text(f"a\n{PERFORMANCE[0]}\nold\n{PERFORMANCE[1]}\nb\n{AUTOSCALING[0]}\n{AUTOSCALING[1]}\n")
    runs = tmp_path / "results"
    write_run(runs, "quick", "bbt-cma", 1, bbt(0.6, 0.6))
    main(["--runs", str(runs), "--output", str(tmp_path / "RESULTS.md"), "--bench", str(bench)])
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and perf in readme and scaling in readme


def test_readme_performance_figures_are_the_rendered_bench_files():
    """The README's tables are what the renderer makes of results/bench/ now: none typed by hand."""
    from pathlib import Path

    from raydapt.results import AUTOSCALING, BENCH_DIR, PERFORMANCE, autoscaling_block, performance_block
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for (begin, end), block in ((PERFORMANCE, performance_block(BENCH_DIR)), (AUTOSCALING, autoscaling_block(BENCH_DIR))):
        assert readme.split(begin, 1)[1].split(end, 1)[0] == f"\n{block}"
    assert (BENCH_DIR / "oracle.json").exists() and (BENCH_DIR / "search.json").exists()


def idpt_run(method, seed, a, b, manual):
    return {"method": method, "seed": seed, "tasks": ["t1", "t2"], "kinds": {"t1": "classification", "t2": "generation"},
            "test_exact_match": {"t1": a, "t2": b}, "test_average": (a + b) / 2,
            "manual_prompt_test_exact_match": {"t1": manual, "t2": 0.0}, "manual_prompt_test_average": manual / 2,
            "trainable_parameters": 100 if method == "static" else 900, "config": {"steps": 30, "batch": 16}}


def test_idpt_section_pairs_seeds(tmp_path):
    runs = tmp_path / "results"
    write_run(runs, "quick", "idpt", 1, idpt_run("idpt", 1, 0.6, 0.2, 0.5), [])
    write_run(runs, "quick", "idpt", 2, idpt_run("idpt", 2, 0.8, 0.2, 0.5), [])
    write_run(runs, "quick", "idpt-static", 1, idpt_run("static", 1, 0.5, 0.1, 0.5), [])
    write_run(runs, "quick", "idpt-static", 2, idpt_run("static", 2, 0.5, 0.2, 0.5), [])
    text = render(collect(runs))
    # t1: ID-PT 60/80, static 50/50, paired differences 10 and 30 -> 20.00 ± 14.14
    assert "| t1 | classification | 50.00 ± 0.00 | 50.00 ± 0.00 | 70.00 ± 14.14 | 20.00 ± 14.14 |" in text
    assert "| average |  | 25.00 ± 0.00 | 32.50 ± 3.54 | 45.00 ± 7.07 | 12.50 ± 3.54 |" in text
    assert "ID-PT" not in readme_block(collect(runs))  # the README block stays the default task's


def recursive_run(method, seed, score, correct, first_correct, **extra):
    return {"method": method, "seed": seed, "task": "closing_brackets", "n_test": 4, "test_exact_match": score,
            "first_pass_test_exact_match": sum(first_correct) / 4, "test_correct": correct,
            "first_pass_test_correct": first_correct, "connector_held_out_lm_loss": None,
            "config": {"steps": 40, "second_steps": 40, "pretrain_steps": 40, "batch": 16, "pretrain_batch": 16,
                       "samples": 4, "temperature": 0.5}, **extra}


def test_recursive_section_pairs_seeds_and_rows(tmp_path):
    runs = tmp_path / "results"
    write_run(runs, "quick", "recursive-one", 1, recursive_run("one_pass", 1, 0.3, [1, 0, 0, 0], [1, 0, 0, 0]), [])
    write_run(runs, "quick", "recursive-one", 2, recursive_run("one_pass", 2, 0.4, [1, 0, 0, 0], [1, 0, 0, 0]), [])
    votes = {"any_answer_test_exact_match": 0.5, "majority_vote_test_exact_match": 0.25}
    write_run(runs, "quick", "recursive-textual", 1,
              recursive_run("textual", 1, 0.4, [1, 1, 0, 0], [1, 0, 1, 0], **votes), [])
    write_run(runs, "quick", "recursive-textual", 2,
              recursive_run("textual", 2, 0.6, [1, 1, 1, 0], [0, 0, 0, 0], **votes), [])
    text = render(collect(runs))
    # Differences from one pass 0.1 and 0.2: 15.00 ± 7.07, t = 3 on 1 degree of freedom: p = 0.205.
    # Rows: seed 1 gains 1 and loses 1, seed 2 gains 3: 4 / 1, exact binomial p = 12/32 = 0.375.
    assert "| textual: pass 2 reads k sampled answers | 50.00 ± 14.14 | 15.00 ± 7.07 | 0.205 | 25.00 ± 35.36 | 4 / 1 | 0.375 |" in text
    assert "| one pass (its prompt trained for all the steps) | 35.00 ± 7.07 | – | – | 25.00 ± 0.00 | – | – |" in text
    assert "one of them right 50.00 ± 0.00, their majority vote right 25.00 ± 0.00" in text
    assert "Recursive" not in readme_block(collect(runs))  # the README block stays the default task's


def _oracle_figures() -> dict:
    """bench/oracle.py's figures, as it writes them, with round numbers."""
    def case(seconds, fraction):
        return {"median_s": seconds, "flops": 1e9, "flops_per_s": 1e9 / seconds, "fraction_of_peak": fraction}

    def at(scale):
        cases = {f"{w}_{k}": case(scale * t, f) for w in ("in_process", "pipeline")
                 for k, t, f in (("shared", 1.0, 0.5), ("unshared", 2.0, 0.6), ("one_by_one", 4.0, 0.3))}
        ratios = {"one_by_one_over_shared_in_process": 4.0, "one_by_one_over_shared_pipeline": 3.5,
                  "one_by_one_over_unshared_in_process": 2.0, "one_by_one_over_unshared_pipeline": 1.75,
                  "unshared_over_shared_in_process": 2.0, "unshared_over_shared_pipeline": 2.0,
                  "pipeline_over_in_process_shared": 0.9}
        return {"cases": cases, "ratios": ratios, "mean_input_tokens": 20.0, "shared_work_fraction": 0.33,
                "tile": {"examples": 8, "candidates": 4}}

    scaling = {name: {"population": p, "examples": 32, "prompt_length": 10, "stages": 1, "median_s": t,
                      "ratio": t / 0.5} for name, p, t in (("default", 20, 0.5), ("population_x2", 40, 0.9))}
    return {"model": "m", "population": 20, "examples": 32, "prompt_lengths": [10, 50], "micro_batch": 32,
            "repeats": 3, "quick": False, "synthetic": False,
            "peak": {"flops_per_s": 80e9, "threads": 1, "all_threads_flops_per_s": 45e9, "all_threads": 2,
                     "shapes": []},
            "peak_after": 78e9, "limit": {"10": at(0.5), "50": at(1.0)}, "scaling": scaling,
            "uptime_before": "up 3:00, load average: 1.00, 1.00, 1.00", "uptime_after": "x", "machine": _machine()}


def test_oracle_table_from_known_figures(tmp_path):
    from raydapt.results import performance_block
    (tmp_path / "oracle.json").write_text(json.dumps(_oracle_figures()))
    perf = performance_block(tmp_path)
    assert "80.0 GFLOP/s on 1 torch thread (78.0 after the cases; 45.0 on 2 threads)" in perf
    assert "load average: 1.00, 1.00, 1.00" in perf
    assert "| 50 | the population in one request, prompt prefix shared | 1000 ms | 50% | 1000 ms | 50% |" in perf
    assert "| 10 | one candidate per request (BBT's reference code), unshared | 2000 ms | 30% | 2000 ms | 30% |" in perf
    assert ("| one candidate per request / the population batched with a shared prefix, in process | 4.00x | "
            "4.00x | >= 3x at L = 50 |") in perf
    assert "| FLOPs of the shared request / the unshared one | 0.33 | 0.33 | |" in perf
    assert "| population x 2 | 40 | 32 | 10 | 1 | 900 ms | 1.80x |" in perf
    figures = _oracle_figures()
    del figures["scaling"]  # --only limit: no scaling table
    (tmp_path / "oracle.json").write_text(json.dumps(figures))
    assert "/ default |" not in performance_block(tmp_path)


def extend_run(method, lr, original, new, gate=None):
    return {"method": method, "lr": lr, "original_loss": original, "new_loss": new, "trainable_parameters": 100,
            "backbone_losses": {"original_eval": 4.0, "new_test": 7.0},
            "gate_mean": {"original": gate and gate[0], "original_mix": gate and gate[0], "new": gate and gate[1]},
            "config": {"steps": 40, "batch": 8, "context": 64, "original_fraction": 0.1, "workers": 2,
                       "eval_blocks": 16}}


def test_extend_section_pareto_and_pairs(tmp_path):
    runs = tmp_path / "results"
    # (original-domain loss, new-language loss) per seed; the backbone is (4.0, 7.0) on both seeds.
    # Seed 1: neutral (4.2, 5.5) dominates adapter (4.3, 5.6). Seed 2: adapter (4.35, 5.65) dominates
    # neutral (4.4, 5.7). Means: neutral (4.3, 5.6) dominates adapter (4.325, 5.625); full (5.05, 4.65) trades.
    for seed, neutral, adapter, full in ((1, (4.2, 5.5), (4.3, 5.6), (4.9, 4.5)),
                                         (2, (4.4, 5.7), (4.35, 5.65), (5.2, 4.8))):
        write_run(runs, "quick", "extend-neutral", seed, extend_run("neutral", 0.002, *neutral, gate=(0.1, 0.5)))
        write_run(runs, "quick", "extend-adapter", seed, extend_run("adapter", 0.002, *adapter))
        write_run(runs, "quick", "extend-full", seed, extend_run("full", 0.0005, *full))
    text = render(collect(runs), tmp_path)
    assert "| backbone (frozen, no extension) | – | – | 1, 2 | 0 | 7.000 ± 0.000 | 4.000 ± 0.000 | – |" in text
    assert ("| extend-neutral | neutral | 0.002 | 1, 2 | 100 | 5.600 ± 0.141 | 4.300 ± 0.141 | 0.300 ± 0.141 "
            "| 0.100 ± 0.000 | 0.100 ± 0.000 | 0.500 ± 0.000 |") in text
    assert ("| extend-full | full | 0.0005 | 1, 2 | 100 | 4.650 ± 0.212 | 5.050 ± 0.212 | 1.050 ± 0.212 "
            "| – | – | – |") in text
    # neutral − full: new 1.0 and 0.9 (t = 19, 1 df: p = 0.033), original -0.7 and -0.8 (t = -15: p = 0.042)
    assert ("| extend-full (2 seeds) | 0.950 ± 0.071 | 0.033 | neutral learns less | -0.750 ± 0.071 | 0.042 | "
            "neutral forgets less |") in text
    assert ("| extend-adapter (2 seeds) | -0.025 ± 0.106 | 0.795 | no difference beyond the noise | -0.025 ± 0.106 "
            "| 0.795 | no difference beyond the noise |") in text
    assert "on the front in 1/2 seeds (dominated on seed 2 by extend-adapter);" in text
    assert ("on the means over seeds: on the front; the front of the means, by forgetting: backbone (frozen, no "
            "extension), extend-neutral, extend-full.") in text
    assert ("- neutral residues' mean gate: 0.100 ± 0.000 on original-domain eval tokens, 0.500 ± 0.000 on "
            "new-language tokens, ratio 0.20 ± 0.00") in text
    assert "![learning vs forgetting](results/quick/extend-tradeoff.png)" in text
    assert (runs / "quick" / "extend-tradeoff.png").stat().st_size > 0
    block = readme_block(collect(runs))
    assert "new-language loss 5.600 ± 0.141 (backbone 7.000 ± 0.000)" in block
    assert block.endswith("on the Pareto front of the methods' means: yes.\n")


def test_extend_pareto_names_who_dominates(tmp_path):
    from collections import defaultdict

    from raydapt.results import extend_pareto
    runs = tmp_path / "results"
    write_run(runs, "quick", "extend-neutral", 1, extend_run("neutral", 0.002, 4.5, 6.0))
    write_run(runs, "quick", "extend-lora", 1, extend_run("lora", 0.002, 4.4, 5.9))
    write_run(runs, "quick", "extend-adapter", 1, extend_run("adapter", 0.002, 4.5, 6.0))  # a tie dominates nothing
    rows = defaultdict(list)
    for r in collect(runs):
        rows[r["_name"]].append(r)
    pareto = extend_pareto(rows)
    assert pareto["seeds"] == {1: (False, ["extend-lora"])}
    assert pareto["means"] == (False, ["extend-lora"])
    assert pareto["front"] == ["backbone (frozen, no extension)", "extend-lora"]
    assert "| extend-lora (1 seeds) | 0.100 | – | not tested (one seed or no spread) |" in render(collect(runs))


def test_suite_extend_runs_cover_every_method_and_parse():
    """Every extension method has a suite run (the trade-off table's rows), and each run's flags parse
    with the quick preset, never with --local (extend always trains on Ray Train)."""
    import importlib.util
    from pathlib import Path

    from raydapt.adapters.config import METHODS
    from raydapt.config import parse_args
    from raydapt.extend.config import QUICK, ExtendConfig

    spec = importlib.util.spec_from_file_location("suite_under_test", Path(__file__).parents[1] / "jobs" / "suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    extend = {name: flags for name, (job, flags) in suite.RUNS.items() if job == "extend"}
    assert "extend" in suite.NEEDS_RAY
    methods = {parse_args(ExtendConfig, ["--quick", "--seed", "1", *flags], presets={"quick": QUICK}).method
               for flags in extend.values()}
    assert methods == set(METHODS)
    assert all(flags == ["--method", name.removeprefix("extend-")]
               for name, flags in extend.items() if "--lr" not in flags)
