"""Meta-learning the difference (MLtD): TARP, TAMS and first-order MAML on Ray Train over a multi-domain
task distribution built from this machine's text, scored by test perplexity on held-out domains.

    python jobs/mltd.py --quick --method tarp-meta --seed 1
    python jobs/mltd.py --method tams-meta --workers 2
    python jobs/mltd.py --quick --method lora --train-sequences 50 --meta-test-domains pydoc
    ray job submit --working-dir . -- python jobs/mltd.py --quick
"""
import json
import sys

from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error
from raydapt.mltd.config import QUICK, MLtDConfig

SUMMARY = ("method", "seed", "perplexity", "mean_perplexity", "trainable_share", "wall_time_s")


def _ray_runtime():
    from actors.runner import RayRuntime  # imported once the inputs are checked
    return RayRuntime()


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(MLtDConfig, argv, presets={"quick": QUICK}, prog="jobs/mltd.py")
    from raydapt.mltd.job import run_mltd_job  # after parsing: a bad flag is refused in seconds

    result = run_mltd_job(cfg, _ray_runtime)
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
