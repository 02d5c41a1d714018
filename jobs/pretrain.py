"""Build raydapt's default tokenizer and "large"/"small" LMs from the standard library's source.

    python jobs/pretrain.py                 # full build into $RAYDAPT_HOME/models (~10 min on 2 cores)
    python jobs/pretrain.py --quick         # tiny models in seconds (tests, smoke runs)
    python jobs/pretrain.py --output-dir D  # elsewhere
"""
from __future__ import annotations

import shlex
import sys

from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error
from raydapt.pretrain import QUICK, PretrainConfig, build_default_models


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(PretrainConfig, argv, presets={"quick": QUICK})
    build_default_models(cfg, command=shlex.join(["python", "jobs/pretrain.py", *argv]))


if __name__ == "__main__":
    main()
