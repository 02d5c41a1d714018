"""Gradient prompt tuning through the white-box large LM: the upper reference for BBT.

    python jobs/prompt_tuning.py --seed 7 --output-dir runs/gradient-7
"""
import json
import sys

from raydapt.bbt.gradient_job import GradientConfig, run_gradient_job
from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    result = run_gradient_job(parse_args(GradientConfig, argv, prog="jobs/prompt_tuning.py"))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
