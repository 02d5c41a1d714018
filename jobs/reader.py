"""A frozen reader: BM25-retrieved passages packed into the frozen large LM's context, and a soft
prompt tuned through the gray-box pipeline to answer from them (or, --mode closed_book, from the
question alone), on the built-in open-book task.

    python jobs/reader.py --quick --seed 7
    python jobs/reader.py --mode closed_book --stages 2 --replicas 2
    ray job submit --working-dir . -- python jobs/reader.py --quick
"""
import json
import sys

from actors.runner import runtime_for
from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error
from raydapt.reader.config import QUICK, ReaderConfig
from raydapt.reader.job import run_reader_job

SUMMARY = ("mode", "seed", "test_exact_match", "dev_exact_match", "wall_time_s")


@exit_on_user_error
def main(argv=None):
    cfg = parse_args(ReaderConfig, argv, presets={"quick": QUICK}, prog="jobs/reader.py")
    result = run_reader_job(cfg, runtime_for(cfg.local))
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
