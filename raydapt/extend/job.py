"""An extension run from its config to its output directory.

Inputs are checked and every token block is built before the output directory exists; Ray Train
workers (`Runtime.train_extension`) then train only the extension's parameters on the planned
batches (batch t is a function of (seed, t), so a killed worker changes nothing), and this process
scores the backbone and the extended model on the four evaluation sets: learning (new-language test
loss) and forgetting (original-domain loss on the evaluation source, which was never mixed in).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from raydapt.adapters import AdapterConfig, attach, load_trainable
from raydapt.adapters.attach import backbone_parameters
from raydapt.adapters.loss import gate_means
from raydapt.bbt.job import prepare_output_dir
from raydapt.config import to_dict
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.extend.config import RESULT_NEUTRAL_FIELDS
from raydapt.extend.data import EVAL_SETS, build_data, read_corpora, step_rows
from raydapt.models.checkpoint import load_tokenizer, model_info
from raydapt.outputs import append_jsonl, read_json, save_tensors, write_atomic, write_result

__all__ = ["run_extend_job", "evaluate", "load_extended", "ADAPTERS_FILE"]

ADAPTERS_FILE = "adapters.safetensors"
EVAL_BATCH = 16


def run_extend_job(cfg, make_runtime) -> dict:
    """Run one extension; `make_runtime()` gives the Ray side (Ray Train), called once every input
    has been checked, so a bad flag never waits for Ray to import."""
    started = time.perf_counter()
    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")))
    info = model_info(cfg.model)  # config.json only: before the corpora, which take seconds to read
    if cfg.context > info.max_positions:
        raise UserError(f"--context {cfg.context} exceeds the model's context of {info.max_positions}")
    corpora = read_corpora(cfg)  # a missing or empty corpus fails here, before the tokenizer is read
    data = build_data(cfg, load_tokenizer(cfg.model), corpora)  # before the output dir exists
    # Ray Train keeps this run's checkpoints (<storage>/extend) and resumes from them by itself.
    out, _ = prepare_output_dir(cfg, RESULT_NEUTRAL_FIELDS, marker="no-signed-checkpoint-here")
    if cfg.resume and (out / "result.json").exists():
        return read_json(out / "result.json")  # a finished run is kept as it is
    plan = step_rows(data.train_original, cfg.batch, cfg.steps, cfg.original_fraction, cfg.seed)
    runtime = make_runtime()
    runtime.start(math.ceil(cfg.workers * cfg.cpus_per_worker), dashboard=True)  # Ray Train queries its state there
    storage = cfg.storage_path or str((out / "train").resolve())
    marker = str((out / "fault-injected").resolve())
    run = runtime.train_extension(cfg, cfg.adapter().to_json(), data.train, data.train_original, plan, storage, marker)
    try:
        return _finish(cfg, out, data, run, started, Path(marker).exists())
    finally:
        shutil.rmtree(run["checkpoint"], ignore_errors=True)


def load_extended(model_dir: str, adapter: AdapterConfig, tensors: dict[str, torch.Tensor] | None, seed: int = 0):
    """The backbone from `model_dir` with `adapter` attached and `tensors` loaded (eval mode)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    torch.manual_seed(seed)
    model, adapter = attach(model, adapter)
    if tensors is not None:
        load_trainable(model, tensors)
    return model.eval(), adapter


@torch.no_grad()
def evaluate(model, blocks: np.ndarray, original: bool, batch: int = EVAL_BATCH) -> dict:
    """Mean next-token loss over the blocks (n, T), and the mean gate value (None: no gate)."""
    total, gates = 0.0, []
    for start in range(0, len(blocks), batch):
        x = torch.from_numpy(blocks[start:start + batch])
        total += float(model(input_ids=x, labels=x).loss) * len(x)
        mask = torch.full(x.shape, original)
        g = gate_means(model, mask)
        if g is not None:
            gates.append(g["original" if original else "new"] * len(x))
    return {"loss": total / len(blocks), "gate": sum(gates) / len(blocks) if gates else None}


def _scores(model, data) -> dict:
    return {name: evaluate(model, data.eval[name], original=name.startswith("original")) for name in EVAL_SETS}


def _finish(cfg, out: Path, data, run: dict, started: float, killed: bool) -> dict:
    from safetensors.torch import load_file

    adapter = AdapterConfig.from_json(run["adapter"])
    tensors = load_file(str(Path(run["checkpoint"]) / ADAPTERS_FILE))
    backbone, _ = load_extended(cfg.model, AdapterConfig(method="full"), None)
    base_scores = _scores(backbone, data)
    n_backbone = backbone_parameters(backbone)
    del backbone
    model, _ = load_extended(cfg.model, adapter, tensors, cfg.seed)
    scores = _scores(model, data)
    meta = {"adapter_config": adapter.to_json(), "model": str(Path(cfg.model).resolve()), "method": cfg.method,
            "seed": str(cfg.seed)}
    save_tensors(out / ADAPTERS_FILE, {k: v.numpy() for k, v in tensors.items()}, metadata=meta)
    log = out / "log.jsonl"
    write_atomic(log, b"")
    for row in run["history"]:
        append_jsonl(log, row)
    _plot(out / "curve.png", run["history"], f"{cfg.method}, lr {cfg.lr}, seed {cfg.seed}")
    trainable = sum(v.numel() for v in tensors.values())
    result = {
        "method": cfg.method, "seed": cfg.seed, "lr": cfg.lr,
        "new_loss": scores["new_test"]["loss"], "original_loss": scores["original_eval"]["loss"],
        "losses": {k: v["loss"] for k, v in scores.items()},
        "backbone_losses": {k: v["loss"] for k, v in base_scores.items()},
        "gate_mean": {"original": scores["original_eval"]["gate"], "original_mix": scores["original_mix"]["gate"],
                      "new": scores["new_test"]["gate"]},
        "final_train_loss": run["history"][-1]["loss"], "first_train_loss": run["history"][0]["loss"],
        "steps": run["steps"], "trainable_parameters": trainable, "backbone_parameters": n_backbone,
        "extra_fraction": trainable / n_backbone, "hidden": adapter.hidden, "rank": adapter.rank,
        "worker_failures_injected": int(killed), "data": data.stats,
        "wall_time_s": time.perf_counter() - started, "config": to_dict(cfg),
    }
    write_result(out, result)
    return result


def _plot(path: Path, history: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    left.plot(steps, [r["lm"] for r in history], color="tab:blue", lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("LM loss (train mix)", color="tab:blue")
    right = left.twinx()
    right.plot(steps, [r["aux"] for r in history], color="tab:red", lw=0.8)
    right.set_ylabel("auxiliary term (l1 or BCE)", color="tab:red")
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
