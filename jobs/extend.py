"""Extend the frozen large LM to a new language (default: French from this machine's gettext
catalogs) with neutral residues or a baseline, trained with Ray Train.

    python jobs/extend.py --quick --seed 7
    python jobs/extend.py --method lora --lr 0.001
    python jobs/extend.py --quick --sweep-methods neutral,adapter,lora,full --sweep-lrs 0.0005,0.002
    ray job submit --working-dir . -- python jobs/extend.py --quick
"""
import json
import sys

from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error
from raydapt.extend.config import QUICK, ExtendConfig

SUMMARY = ("method", "seed", "lr", "new_loss", "original_loss", "backbone_losses", "gate_mean", "wall_time_s")


def _ray_runtime():
    from actors.runner import RayRuntime  # imported once the inputs are checked
    return RayRuntime()


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(ExtendConfig, argv, presets={"quick": QUICK}, prog="jobs/extend.py")
    from raydapt.extend.job import run_extend_job  # after parsing: a bad flag is refused in seconds

    if cfg.is_sweep:
        from raydapt.extend.sweep import run_sweep
        print(json.dumps(run_sweep(cfg, _ray_runtime, run_extend_job), indent=1))
        return
    result = run_extend_job(cfg, _ray_runtime)
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
