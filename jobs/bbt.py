"""Black-box prompt tuning (BBT / BBTv2) of the frozen large LM through the sharded oracle.

    python jobs/bbt.py --quick --seed 7
    python jobs/bbt.py --method bbtv2 --optimizer TwoPointsDE --replicas 2 --stages 2
    ray job submit --working-dir . -- python jobs/bbt.py --quick
"""
import json
import sys

from actors.runner import runtime_for
from raydapt.bbt.config import QUICK, BBTConfig
from raydapt.bbt.job import run_search_job
from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error

SUMMARY = ("method", "optimizer", "seed", "api_calls", "dev_accuracy", "test_accuracy",
           "manual_prompt_test_accuracy", "wall_time_s")


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(BBTConfig, argv, presets={"quick": QUICK}, prog="jobs/bbt.py")
    result = run_search_job(cfg, runtime_for(cfg.local))
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
