"""A BBT / BBTv2 run from its config to its output directory.

Writes: config.json, log.jsonl (one row per generation), checkpoint/ (signed, after every generation),
best_prompt.safetensors (z and the materialised prompt), curve.png, and result.json last: a
directory with result.json holds a finished run.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from raydapt.bbt.config import RESULT_NEUTRAL_FIELDS
from raydapt.bbt.inputs import EncodedTask, encode_task, load_configured_task
from raydapt.bbt.losses import accuracy, macro_f1
from raydapt.bbt.search import PromptSearch
from raydapt.bbt.space import DeepPromptSpace, PromptSpace
from raydapt.config import to_dict
from raydapt.errors import UserError
from raydapt.outputs import has_checkpoint, read_json, read_jsonl, save_tensors, write_json

__all__ = ["prepare_output_dir", "build_space", "run_search_job", "plot_curves"]


def prepare_output_dir(cfg, neutral=RESULT_NEUTRAL_FIELDS, marker="checkpoint") -> tuple[Path, bool]:
    """Create the output dir, or check that --resume continues a run of the same config.

    Returns (dir, resuming): resuming when --resume finds a checkpoint folder `marker` there that this
    installation signed; any other checkpoint there is refused here, before a worker starts.
    """
    out = Path(cfg.output_dir)
    has_run = (out / "config.json").exists()
    if cfg.resume and has_run:
        saved, now = read_json(out / "config.json"), to_dict(cfg)
        differs = sorted(k for k in now if k not in neutral and saved.get(k) != now[k])
        if differs:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in differs[:4])
            raise UserError(f"--resume: {out} holds a run of a different config ({detail})")
        return out, has_checkpoint(out / marker)
    if has_run and not cfg.resume:
        raise UserError(f"--output-dir {out} already holds a run; pass --resume to continue it or choose another directory")
    if cfg.resume:  # nothing to continue: say so rather than start fresh silently
        print(f"note: --resume: {out} holds no run; starting fresh", flush=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be created ({e.strerror})")
    write_json(out / "config.json", to_dict(cfg))
    return out, False


def build_space(cfg, oracle, data: EncodedTask):
    """BBT's projection scaled by the embeddings' std; BBTv2's per layer by each layer's hidden std."""
    stats = oracle.statistics(data.train.input_ids, data.train.lengths)
    info = oracle.info
    if cfg.method == "bbtv2":
        return DeepPromptSpace(cfg.intrinsic_dim, cfg.prompt_length, info.hidden_dim, stats["hidden_std"], cfg.seed,
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


def run_search_job(cfg, search_cls=PromptSearch, extra_result=None) -> dict:
    """Run (or resume) a search job end to end and return result.json's content."""
    from actors.pipeline import FaultInjection, PoolSpec, model_info, open_pool
    from raydapt.defaults import default_model_dir
    from raydapt.oracle import ShardedOracle
    from raydapt.search.optimizers import make_optimizer

    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")))
    started = time.perf_counter()
    # Every input check before any actor starts: a bad flag costs a second, not a cluster launch.
    make_optimizer(cfg.optimizer, cfg.intrinsic_dim, cfg.popsize, 1, seed=cfg.seed, sigma=cfg.sigma)
    spec = PoolSpec(cfg.model, cfg.stages, cfg.replicas, cfg.cpus_per_stage, cfg.gpus_per_stage,
                    strategy=cfg.placement)
    spec.validate()
    fault = FaultInjection.parse(cfg.fault_injection)
    data = _encode(cfg, model_info(cfg.model))
    out, resuming = prepare_output_dir(cfg)
    pool = open_pool(spec, cfg.local, fault)
    try:
        oracle_metrics, search_metrics = None, None
        if not cfg.local:  # on Ray: export raydapt_* metrics to the dashboard / Prometheus
            from actors.metrics import OracleMetrics, SearchMetrics
            oracle_metrics, search_metrics = OracleMetrics(), SearchMetrics(cfg.method, cfg.budget)
        oracle = ShardedOracle(pool, cfg.micro_batch, reporter=oracle_metrics)
        search = search_cls(cfg, oracle, data, build_space(cfg, oracle, data), out, reporter=search_metrics)
        state = search.resume() if resuming else search.fresh_state()
        state = search.run(state)
        best = state.best_z if state.best_z is not None else state.best_train_z
        prompt = search.full_prompt(best)[0]
        test_logits = search.score(data.test, prompt[None])[0]
        manual_logits = oracle.label_logits(data.manual_test.input_ids, data.manual_test.lengths, data.label_ids)[0]
        save_tensors(out / "best_prompt.safetensors", {"z": best.astype(np.float32), "prompt": prompt},
                     metadata={"method": cfg.method, "mode": "deep" if cfg.method == "bbtv2" else cfg.mode})
        result = {
            "method": cfg.method, "optimizer": cfg.optimizer, "seed": cfg.seed, "budget": cfg.budget,
            "api_calls": state.api_calls, "generations": state.generation,
            "best_train_loss": state.best_train_loss, "dev_accuracy": state.best_dev_accuracy,
            "test_accuracy": float(accuracy(test_logits, data.test.labels)),
            "test_f1": float(macro_f1(test_logits, data.test.labels)),
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
        plot_curves(out / "curve.png", {cfg.method.upper(): read_jsonl(out / "log.jsonl")},
                    f"{cfg.method} / {cfg.optimizer}, seed {cfg.seed}")
        write_json(out / "result.json", result)
        return result
    finally:
        if hasattr(pool, "shutdown"):
            pool.shutdown()


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
