"""Input-dependent prompt tuning (or --method static) of the frozen large LM through the gray-box
pipeline, on the built-in mix of tasks.

    python jobs/idpt.py --quick --seed 7
    python jobs/idpt.py --method static --stages 2 --replicas 2
    ray job submit --working-dir . -- python jobs/idpt.py --quick
"""
import json
import sys

from actors.runner import runtime_for
from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error
from raydapt.idpt.config import QUICK, IDPTConfig
from raydapt.idpt.job import run_idpt_job

SUMMARY = ("method", "seed", "test_exact_match", "test_average", "manual_prompt_test_average", "wall_time_s")


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(IDPTConfig, argv, presets={"quick": QUICK}, prog="jobs/idpt.py")
    result = run_idpt_job(cfg, runtime_for(cfg.local))
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
