"""A GDFO run end to end, optionally beside a BBT baseline with the same seed and budget."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from raydapt.bbt.config import BBTConfig
from raydapt.bbt.job import plot_curves, run_search_job
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.gdfo.search import GDFOSearch
from raydapt.outputs import calls_to_reach, read_json, read_jsonl, write_json
from raydapt.serving import Runtime

__all__ = ["run_gdfo_job", "check_student"]


def check_student(cfg) -> None:
    """The student must exist and map every label word to one token, by the teacher's rule."""
    from transformers import AutoTokenizer

    from raydapt.bbt.inputs import load_configured_task
    from raydapt.data.tasks import label_token_ids
    from raydapt.models.checkpoint import read_config

    read_config(cfg.student)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    except (OSError, ValueError) as e:
        raise UserError(f"--student {cfg.student} has no usable tokenizer ({str(e).splitlines()[0]})")
    words = load_configured_task(cfg).verbalizer
    try:
        label_token_ids(tokenizer, words)
    except UserError as e:
        raise UserError(f"--verbalizer: in the tokenizer of --student {cfg.student}: {e}" if cfg.task
                        else f"--student {cfg.student}: the built-in task's {e}")


def _method(cfg) -> str:
    return "gdfo" if cfg.variant == "gdfo" else "gdfo-gradient-only"


def _gdfo_result(search: GDFOSearch, state) -> dict:
    search.student.submit("save", str(search.out_dir / "student")).result()
    # The gradient-only ablation asks no optimizer: its rows must not name one.
    none = {"optimizer": "none"} if search.cfg.variant == "gradient" else {}
    return {"method": _method(search.cfg)} | none | search.summary(state)


def run_gdfo_job(cfg, runtime: Runtime, start_student=None) -> dict:
    """GDFO (and by default its BBT baseline) on `runtime`; the student runs where
    `runtime.student_starter()` puts it unless `start_student` says otherwise (see `GDFOSearch`)."""
    cfg = dataclasses.replace(cfg, student=cfg.student or str(default_model_dir("small")),
                              model=cfg.model or str(default_model_dir("large")))
    check_student(cfg)
    gdfo_search = functools.partial(GDFOSearch, start_student=start_student or runtime.student_starter())
    if cfg.baseline == "none":
        return run_search_job(cfg, runtime, gdfo_search, _gdfo_result, _method(cfg))
    root = Path(cfg.output_dir)
    bbt_fields = {f.name for f in dataclasses.fields(BBTConfig)}
    bbt_cfg = BBTConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in bbt_fields})
    runs = {}
    for name, run_cfg, run in (("bbt", bbt_cfg, lambda c: run_search_job(c, runtime)),
                               ("gdfo", cfg, lambda c: run_search_job(c, runtime, gdfo_search, _gdfo_result,
                                                                      _method(c)))):
        out = root / name
        sub = dataclasses.replace(run_cfg, output_dir=str(out), resume=cfg.resume)
        runs[name] = read_json(out / "result.json") if (out / "result.json").exists() else run(sub)
    logs = {name.upper(): read_jsonl(root / name / "log.jsonl") for name in runs}
    plot_curves(root / "curve.png", logs, f"GDFO vs BBT, seed {cfg.seed}, budget {cfg.budget}")
    target = runs["bbt"]["dev_accuracy"]
    reach = {name: calls_to_reach(logs[name.upper()], target) for name in runs}
    comparison = {"bbt_final_dev_accuracy": target, "calls_to_reach_it": reach,
                  "call_ratio_gdfo_over_bbt": (reach["gdfo"] / reach["bbt"]) if reach["gdfo"] and reach["bbt"] else None,
                  "test_accuracy": {n: r["test_accuracy"] for n, r in runs.items()},
                  "manual_prompt_test_accuracy": runs["bbt"]["manual_prompt_test_accuracy"]}
    write_json(root / "comparison.json", comparison)
    return runs["gdfo"] | {"comparison": comparison}
