"""CombLM: fine-tune a small expert with Ray Train and learn to mix it with the black-box large LM.

    python jobs/comblm.py --quick
    python jobs/comblm.py --fit-mix 0.5 --output-dir runs/comblm-mix
    python jobs/comblm.py --target my_domain/ --general other_text.jsonl
    ray job submit --working-dir . -- python jobs/comblm.py --quick
"""
import sys

from actors.runner import RayRuntime
from raydapt.comblm.config import QUICK, CombLMConfig
from raydapt.comblm.job import run_comblm_job
from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error


def table(result: dict) -> str:
    """Target and general perplexity per model, best first."""
    ppl, gen = result["perplexity"], result["general_perplexity"]
    rows = [f"{'model / combiner':24s} {'target ppl':>10s} {'general ppl':>11s}"]
    rows += [f"{name:24s} {ppl[name]:10.2f} {gen[name]:11.2f}" for name in sorted(ppl, key=ppl.get)]
    gain = result["gain"]
    rows.append(f"best combiner {gain['best_combiner']}: {100 * gain['best_combiner_gain']:.1f}% lower target "
                f"perplexity than the best single model ({gain['best_single_model']}); wall {result['wall_time_s']:.0f} s")
    return "\n".join(rows)


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(CombLMConfig, argv, presets={"quick": QUICK}, prog="jobs/comblm.py")
    print(table(run_comblm_job(cfg, RayRuntime())))


if __name__ == "__main__":
    main(sys.argv[1:])
