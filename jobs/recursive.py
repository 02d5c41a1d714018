"""Recursive LMs: a second pass of the frozen large LM reads pass 1's sampled answers (textual) or
its final states through a learned connector (neural), on one generation task of the built-in set.

    python jobs/recursive.py --quick --method textual --seed 7
    python jobs/recursive.py --method neural --stages 2 --replicas 2
    ray job submit --working-dir . -- python jobs/recursive.py --quick --method one_pass
"""
import json
import sys

from actors.runner import runtime_for
from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error
from raydapt.recursive.config import QUICK, RecursiveConfig
from raydapt.recursive.job import run_recursive_job

SUMMARY = ("method", "seed", "task", "test_exact_match", "first_pass_test_exact_match", "wall_time_s")


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(RecursiveConfig, argv, presets={"quick": QUICK}, prog="jobs/recursive.py")
    result = run_recursive_job(cfg, runtime_for(cfg.local))
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
