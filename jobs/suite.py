"""Run the method comparison behind RESULTS.md, then regenerate RESULTS.md from the result files.

    python jobs/suite.py [--preset quick|default] [--seeds 1,2,3] [--output-dir results] [--local]

Each run writes its own directory under --output-dir; runs already finished (result.json present)
are kept, so an interrupted suite continues where it stopped. RESULTS.md is then written by
`raydapt.results` from the result.json files: no number is typed by hand.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from raydapt.errors import exit_on_user_error

RUNS = {  # name: (job, extra flags)
    "bbt-cma": ("bbt", []),
    "bbt-ng-CMA": ("bbt", ["--optimizer", "CMA"]),
    "bbt-ng-TwoPointsDE": ("bbt", ["--optimizer", "TwoPointsDE"]),
    "bbt-ng-OnePlusOne": ("bbt", ["--optimizer", "OnePlusOne"]),
    "bbtv2-cma": ("bbt", ["--method", "bbtv2"]),
    "gdfo": ("gdfo", ["--baseline", "none"]),  # BBT runs once, as bbt-cma, with the same seed
    "gdfo-gradient-only": ("gdfo", ["--baseline", "none", "--variant", "gradient"]),
    # The student fitted harder: KL at T = 1, its projection learned, 16 Adam steps at 3e-3 per
    # generation (the default's student ranks the teacher's candidates at Spearman ~0).
    "gdfo-kl-learned": ("gdfo", ["--baseline", "none", "--distill", "kl", "--temperature", "1", "--student-map",
                                 "learned", "--student-steps", "16", "--student-lr", "0.003"]),
    "gradient-white-box": ("prompt_tuning", []),
    "comblm": ("comblm", []),
    "comblm-mix50": ("comblm", ["--fit-mix", "0.5"]),
}
NEEDS_RAY = ("comblm",)  # Ray Train and Ray tasks: --local does not apply


def run(job: str, argv: list[str]) -> None:
    from raydapt.config import parse_args

    if job == "bbt":
        from raydapt.bbt.config import QUICK, BBTConfig
        from raydapt.bbt.job import run_search_job
        run_search_job(parse_args(BBTConfig, argv, presets={"quick": QUICK}))
    elif job == "gdfo":
        from raydapt.gdfo.config import QUICK, GDFOConfig
        from raydapt.gdfo.job import run_gdfo_job
        run_gdfo_job(parse_args(GDFOConfig, argv, presets={"quick": QUICK}))
    elif job == "comblm":
        from raydapt.comblm.config import QUICK, CombLMConfig
        from raydapt.comblm.job import run_comblm_job
        run_comblm_job(parse_args(CombLMConfig, argv, presets={"quick": QUICK}))
    else:
        from raydapt.bbt.gradient_job import GradientConfig, run_gradient_job
        run_gradient_job(parse_args(GradientConfig, argv))


@exit_on_user_error
def suite(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("quick", "default"), default="quick")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--output-dir", type=Path, default=Path("results"))
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    parser.add_argument("--local", action="store_true", help="stages in this process instead of Ray actors")
    args = parser.parse_args(argv)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.runs.split(","):
            job, flags = RUNS[name]
            out = args.output_dir / args.preset / f"{name}-seed{seed}"
            if (out / "result.json").exists():
                continue
            common = ["--seed", str(seed), "--output-dir", str(out)]
            if job == "prompt_tuning":
                from raydapt.bbt.config import QUICK
                quick = (["--prompt-length", str(QUICK["prompt_length"]), "--k-shot", str(QUICK["k_shot"]),
                          "--steps", "100"] if args.preset == "quick" else [])
                run(job, [*common, *quick, *flags])
                continue
            preset = ["--quick"] if args.preset == "quick" else []
            local = ["--local"] if args.local and job not in NEEDS_RAY else []
            resume = ["--resume"] if (out / "config.json").exists() else []
            run(job, [*preset, *common, *local, *resume, *flags])
    from raydapt.results import main as write_results
    write_results(["--runs", str(args.output_dir), "--output", "RESULTS.md"])


if __name__ == "__main__":
    suite()
