"""A BBT / BBTv2 run from its config to its output directory.

Writes: config.json, log.jsonl (one row per generation), checkpoint/ (signed, after every generation),
best_prompt.safetensors (z and the materialised prompt), curve.png, and result.json last: a
directory with result.json holds a finished run.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from raydapt.bbt.config import RESULT_NEUTRAL_FIELDS
from raydapt.bbt.inputs import EncodedTask, encode_task, load_configured_task
from raydapt.bbt.losses import accuracy, confusion_matrix, macro_f1
from raydapt.bbt.search import PromptSearch
from raydapt.bbt.space import DeepPromptSpace, PromptSpace
from raydapt.config import to_dict
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.models.checkpoint import model_info
from raydapt.oracle import ShardedOracle
from raydapt.outputs import (announce_output, has_checkpoint, read_json, read_jsonl, save_tensors, write_json,
                             write_result)
from raydapt.search.optimizers import make_optimizer
from raydapt.serving import FaultInjection, PoolSpec, Runtime, pin_coordinator_threads

__all__ = ["check_resume_config", "prepare_output_dir", "build_space", "run_search_job", "plot_curves"]


def check_resume_config(cfg, neutral=RESULT_NEUTRAL_FIELDS) -> None:
    """--resume onto a run of another config is refused from its config.json alone: a job may call this
    before it reads its data, and writes nothing."""
    out = Path(cfg.output_dir)
    if not (cfg.resume and (out / "config.json").exists()):
        return
    saved, now = read_json(out / "config.json"), to_dict(cfg)
    differs = sorted(k for k in now if k not in neutral and saved.get(k) != now[k])
    if differs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in differs[:4])
        raise UserError(f"--resume: {out} holds a run of a different config ({detail})")


def prepare_output_dir(cfg, neutral=RESULT_NEUTRAL_FIELDS, marker="checkpoint") -> tuple[Path, bool]:
    """Create the output dir, or check that --resume continues a run of the same config.

    Returns (dir, resuming): resuming when --resume finds a checkpoint folder `marker` there that this
    installation signed; any other checkpoint there is refused here, before a worker starts.
    """
    out = Path(cfg.output_dir)
    has_run = (out / "config.json").exists()
    if cfg.resume and has_run:
        check_resume_config(cfg, neutral)
        resuming = has_checkpoint(out / marker)  # refuses an unsigned checkpoint: before any line
        announce_output(out)
        return out, resuming
    if has_run and not cfg.resume:
        raise UserError(f"--output-dir {out} already holds a run; pass --resume to continue it or choose another directory")
    if cfg.resume:  # nothing to continue: say so rather than start fresh silently
        print(f"note: --resume: {out} holds no run; starting fresh", flush=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be created ({e.strerror})")
    write_json(out / "config.json", to_dict(cfg))
    announce_output(out)
    return out, False


def prompt_metadata(cfg, data: EncodedTask) -> dict[str, str]:
    """Everything needed to apply a learned prompt to new inputs, kept in its safetensors header:
    the model, how inputs are encoded (template, placeholder, mode, prompt length) and what the
    label words mean. Lists are JSON (safetensors metadata holds strings only)."""
    return {"method": cfg.method, "mode": "deep" if cfg.method == "bbtv2" else cfg.mode, "input_mode": cfg.mode,
            "model": str(Path(cfg.model).resolve()), "template": data.template, "placeholder": cfg.placeholder,
            "prompt_length": str(cfg.prompt_length), "prompt_offset": str(data.prompt_offset),
            "verbalizer": json.dumps(list(data.verbalizer)), "label_ids": json.dumps([int(i) for i in data.label_ids]),
            "label_names": json.dumps(list(data.label_names or data.verbalizer))}


def run_id(out: Path) -> str:
    """A run's name in metrics: its output directory's last two parts (gdfo-7/bbt, gdfo-7/gdfo)."""
    out = out.resolve()
    return f"{out.parent.name}/{out.name}"


def build_space(cfg, oracle, data: EncodedTask):
    """BBT's projection scaled by the embeddings' std; BBTv2's per layer: layer 0 by the word-embedding
    matrix's std (as BBT, and as the reference deepbbt.py), layer l > 0 by the clipped std of the
    hidden states entering block l."""
    stats = oracle.statistics(data.train.input_ids, data.train.lengths)
    info = oracle.info
    if cfg.method == "bbtv2":
        stds = [stats["embedding_std"], *stats["hidden_std"][1:]]
        return DeepPromptSpace(cfg.intrinsic_dim, cfg.prompt_length, info.hidden_dim, stds, cfg.seed,
                               distribution=cfg.projection, alpha=cfg.alpha, sigma=cfg.sigma)
    return PromptSpace(cfg.intrinsic_dim, cfg.prompt_length, info.embed_dim, stats["embedding_std"], cfg.seed,
                       distribution=cfg.projection, alpha=cfg.alpha, sigma=cfg.sigma)


def _encode(cfg, info) -> EncodedTask:
    from transformers import AutoTokenizer

    task = load_configured_task(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {cfg.model} has no usable tokenizer ({str(e).splitlines()[0]})")
    return encode_task(task, tokenizer, cfg.prompt_length, cfg.mode, info.max_positions, cfg.placeholder)


def run_search_job(cfg, runtime: Runtime, search_cls=PromptSearch, extra_result=None, method: str = "") -> dict:
    """Run (or resume) a search job end to end on `runtime` and return result.json's content.
    `method` names the run in its metrics (default: cfg.method)."""
    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")))
    started = time.perf_counter()
    pin_coordinator_threads()
    # Every input check before any actor starts: a bad flag costs a second, not a cluster launch.
    make_optimizer(cfg.optimizer, cfg.intrinsic_dim, cfg.popsize, 1, seed=cfg.seed, sigma=cfg.sigma, bound=cfg.bound)
    spec = PoolSpec(cfg.model, cfg.stages, cfg.replicas, cfg.cpus_per_stage, cfg.gpus_per_stage,
                    strategy=cfg.placement, prefix_sharing=cfg.prefix_sharing)
    spec.validate()
    fault = FaultInjection.parse(cfg.fault_injection)
    if fault and runtime.local:
        raise UserError("--fault-injection kills a stage actor: it needs Ray (drop --local)")
    data = _encode(cfg, model_info(cfg.model))
    out, resuming = prepare_output_dir(cfg)
    pool = runtime.open_pool(spec, fault)
    try:
        # On Ray these export raydapt_* metrics to the dashboard / Prometheus; in-process, None.
        oracle_metrics = runtime.oracle_reporter()
        search_metrics = runtime.search_reporter(method or cfg.method, cfg.budget, run_id(out))
        oracle = ShardedOracle(pool, cfg.micro_batch, reporter=oracle_metrics)
        search = search_cls(cfg, oracle, data, build_space(cfg, oracle, data), out, reporter=search_metrics)
        state = search.resume() if resuming else search.fresh_state()
        state = search.run(state)
        best = state.best_z if state.best_z is not None else state.best_train_z
        prompt = search.full_prompt(best)[0]
        test_logits = search.score(data.test, prompt[None])[0]
        manual_logits = oracle.label_logits(data.manual_test.input_ids, data.manual_test.lengths, data.label_ids)[0]
        save_tensors(out / "best_prompt.safetensors", {"z": best.astype(np.float32), "prompt": prompt},
                     metadata=prompt_metadata(cfg, data))
        result = {
            "method": cfg.method, "optimizer": cfg.optimizer, "seed": cfg.seed, "budget": cfg.budget,
            "api_calls": state.api_calls, "generations": state.generation,
            "best_train_loss": state.best_train_loss, "dev_accuracy": state.best_dev_accuracy,
            "test_accuracy": float(accuracy(test_logits, data.test.labels)),
            "test_f1": float(macro_f1(test_logits, data.test.labels)),
            "test_report": class_report(test_logits, data),
            "manual_prompt_test_accuracy": float(accuracy(manual_logits, data.test.labels)),
            "n_train": len(data.train.labels), "n_dev": len(data.dev.labels), "n_test": len(data.test.labels),
            "oracle_usage": oracle.usage.as_dict(), "search_time_s": state.elapsed_s,
            # The search loop's time split: inside oracle requests vs. the coordinator's own work.
            "search_oracle_s": state.oracle_s, "search_coordinator_s": state.coordinator_s,
            "wall_time_s": time.perf_counter() - started, "config": to_dict(cfg),
        }
        result |= (extra_result(search, state) if extra_result else {})
        if hasattr(pool, "fault_report"):
            result["fault_tolerance"] = pool.fault_report()
            if oracle_metrics is not None:
                oracle_metrics.failure(result["fault_tolerance"]["stage_restarts"])
        plot_curves(out / "curve.png", {cfg.method.upper(): read_jsonl(out / "log.jsonl")},
                    f"{cfg.method} / {cfg.optimizer}, seed {cfg.seed}")
        write_result(out, result)
        return result
    finally:
        runtime.close_pool(pool)


def class_report(logits: np.ndarray, data: EncodedTask) -> dict:
    """What a user needs to read a test accuracy: which word stands for which class, accuracy per
    class, the confusion matrix (rows: true class, columns: predicted), and a warning when one
    class is predicted for every input (accuracy then says little: it is that class's share)."""
    names = list(data.label_names or data.verbalizer)
    matrix = confusion_matrix(logits, data.test.labels)
    support = matrix.sum(axis=1)
    report = {"labels": [{"class": k, "name": names[k], "word": data.verbalizer[k], "token_id": int(data.label_ids[k])}
                         for k in range(len(data.label_ids))],
              "per_class_accuracy": {str(k): (float(matrix[k, k] / support[k]) if support[k] else None)
                                     for k in range(len(support))},
              "confusion_matrix": matrix.tolist(), "warnings": []}
    predicted = np.flatnonzero(matrix.sum(axis=0))
    if len(predicted) == 1 and len(support) > 1:
        k = int(predicted[0])
        report["warnings"].append(f"the prompt predicts class {k} ({report['labels'][k]['name']!r}) for all "
                                  f"{int(support.sum())} test inputs; its test accuracy is that class's share")
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return report


def plot_curves(path: Path, logs: dict[str, list[dict]], title: str) -> None:
    """Dev accuracy against API calls, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in logs.items():
        points = [(r["api_calls"], r["dev_accuracy"]) for r in rows if "dev_accuracy" in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("API calls (one candidate on the whole train set)")
    ax.set_ylabel("dev accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
