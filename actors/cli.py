"""The `raydapt` command: library functions run on the runtime `--local` picks."""
from __future__ import annotations

import json
import sys

from raydapt.config import parse_args
from raydapt.errors import exit_on_user_error

from actors.runner import runtime_for

__all__ = ["main"]

COMMANDS = {"score": "score a corpus with a sharded model and write per-token parquet",
            "classify": "apply a finished BBT/GDFO run's learned prompt to new inputs, write parquet",
            "generate": "sample text from a finished CombLM run's combined model"}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        print(f"error: unknown command {argv[0]!r}; accepted: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    if not argv or argv[0] in ("-h", "--help"):
        lines = "\n".join(f"  {name:8s} {doc}" for name, doc in COMMANDS.items())
        print(f"usage: raydapt COMMAND [flags]\n\ncommands:\n{lines}")
        return
    if argv[0] == "score":
        from raydapt.score import ScoreConfig, run_score
        cfg = parse_args(ScoreConfig, argv[1:], prog="raydapt score")
        print(json.dumps(run_score(cfg, runtime_for(cfg.local))))
    elif argv[0] == "classify":
        from raydapt.bbt.classify import ClassifyConfig, run_classify
        cfg = parse_args(ClassifyConfig, argv[1:], prog="raydapt classify")
        print(json.dumps(run_classify(cfg, runtime_for(cfg.local))))
    elif argv[0] == "generate":
        from raydapt.comblm.use import GenerateConfig, run_generate
        cfg = parse_args(GenerateConfig, argv[1:], prog="raydapt generate")
        run_generate(cfg, runtime_for(cfg.local))


if __name__ == "__main__":
    main()
