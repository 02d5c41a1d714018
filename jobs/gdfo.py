"""GDFO: black-box prompt search harmonised with gradients through a distilled white-box student.

    python jobs/gdfo.py                          # the default: BBT and GDFO side by side, local Ray
    python jobs/gdfo.py --quick --seed 7
    ray job submit --working-dir . -- python jobs/gdfo.py --quick
"""
import sys

from actors.runner import runtime_for
from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error
from raydapt.gdfo.config import QUICK, GDFOConfig
from raydapt.gdfo.job import run_gdfo_job


def table(result: dict) -> str:
    rows = [("method", "test acc", "dev acc", "API calls")]
    comparison = result.get("comparison")
    if comparison:
        rows.append(("manual prompt", f"{comparison['manual_prompt_test_accuracy']:.3f}", "", "0"))
        rows.append(("BBT", f"{comparison['test_accuracy']['bbt']:.3f}", f"{comparison['bbt_final_dev_accuracy']:.3f}",
                     str(result["budget"])))
    else:
        rows.append(("manual prompt", f"{result['manual_prompt_test_accuracy']:.3f}", "", "0"))
    rows.append((f"GDFO ({result['variant']})", f"{result['test_accuracy']:.3f}", f"{result['dev_accuracy']:.3f}",
                 str(result["api_calls"])))
    lines = [" | ".join(f"{c:>14s}" for c in row) for row in rows]
    if comparison and comparison["call_ratio_gdfo_over_bbt"] is not None:
        lines.append(f"GDFO reached BBT's final dev accuracy with {comparison['call_ratio_gdfo_over_bbt']:.2f}x "
                     "BBT's API calls")
    if result["variant"] == "gdfo":
        lines.append(f"gradient points injected: {result['injected_points']} (trusted only while the student's "
                     f"rank agreement is significant); generations they won: "
                     f"{result['generations_won_by_gradient_points']}")
    if result.get("guided_points_per_generation"):
        lines.append(f"guided samples ({result['guided_points_per_generation']} of {result['config']['popsize']} per generation) "
                     f"won {result['generations_won_by_guided_points']} of {result['generations']} generations")
    lines.append(f"student agreement (Spearman, last 10 generations): {result['student_agreement_last10']:.3f}; "
                 f"waited {result['student_wait_s']:.1f} s for the student")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(GDFOConfig, argv, presets={"quick": QUICK}, prog="jobs/gdfo.py")
    print(table(run_gdfo_job(cfg, runtime_for(cfg.local))))


if __name__ == "__main__":
    main(sys.argv[1:])
