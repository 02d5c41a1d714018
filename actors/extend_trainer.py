"""Training an extension of the frozen LM with Ray Train (neutral residues, its ablations, a vanilla
adapter, LoRA, full fine-tuning): data-parallel `TorchTrainer` workers, gradients of the extension
only averaged by DDP, a checkpoint every few steps, a killed worker restarted from the last one.

The backbone is read from its safetensors and never written; a checkpoint holds only what trains
(`adapters.safetensors`), AdamW's state (safetensors + JSON, no pickle) and the loss history. The
plan of step t (which blocks, which are original-domain) is fixed by the coordinator, so a run that
lost a worker ends with the numbers of one that did not.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from actors.train_checkpoint import (inject_worker_fault, rank0_metrics, report_checkpoint,
                                     restore_trainable)

__all__ = ["train_loop", "train_extension"]

ADAPTERS_FILE = "adapters.safetensors"


def _report(row: dict, model=None, opt=None, adapter_json: str = "", history=()) -> None:
    import ray.train
    from safetensors.torch import save_file

    from raydapt.adapters import trainable_state

    if model is None:
        ray.train.report(row)
        return

    def save_weights(d: str) -> None:
        save_file({k: v.contiguous().clone().cpu() for k, v in trainable_state(model).items()},
                  os.path.join(d, ADAPTERS_FILE))

    state = {"step": row["step"], "history": list(history), "adapter": adapter_json}
    report_checkpoint(row, save_weights, opt, state, "extend-ckpt-")


def train_loop(config: dict) -> None:
    """Ray Train's per-worker loop: each worker takes rows rank::world of every planned batch."""
    import ray.train
    import ray.train.torch
    import torch

    from raydapt.adapters import AdapterConfig
    from raydapt.extend.step import extended_model, optimizer, training_step
    from raydapt.pretrain import lr_at

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model, adapter = extended_model(config["model_dir"], AdapterConfig.from_json(config["adapter"]), config["seed"])
    model.to(device)
    params, opt = optimizer(model, config["lr"])
    start, history = restore_trainable(model, opt, device, ADAPTERS_FILE)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    blocks = torch.from_numpy(np.asarray(config["blocks"], dtype=np.int64))
    original = torch.from_numpy(np.asarray(config["original"], dtype=bool))
    plan = np.asarray(config["plan"])
    steps = len(plan)
    metrics = rank0_metrics(config["run"], rank)
    for step in range(start, steps):
        inject_worker_fault(config, step, rank, world)
        rows = torch.from_numpy(plan[step][rank::world])
        x = blocks[rows].to(device)
        mask = original[rows][:, None].expand_as(x).to(device)  # (b, T) per-token domain
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, config["lr"], 0.05)
        out = training_step(ddp, params, opt, adapter, x, mask)
        row = torch.stack([out["loss"], out["lm"], out["aux"]]).detach().clone()
        if world > 1:
            torch.distributed.all_reduce(row)
            row /= world
        done = step + 1
        history.append({"step": done, "loss": float(row[0]), "lm": float(row[1]), "aux": float(row[2])})
        if metrics:
            metrics.record(done, history[-1]["loss"])
        if done % config["checkpoint_every"] == 0 or done == steps:
            if rank == 0:
                _report(history[-1], model, opt, adapter.to_json(), history)
                sys.stderr.write(f"extend {adapter.method} step {done}/{steps}: loss {history[-1]['loss']:.4f} "
                                 f"(LM {history[-1]['lm']:.4f}, aux {history[-1]['aux']:.4f}; checkpointed)\n")
                sys.stderr.flush()
            else:
                _report(history[-1])



def train_extension(cfg, adapter_json: str, blocks: np.ndarray, original: np.ndarray, plan: np.ndarray,
                    storage: str, fault_marker: str) -> dict:
    """Run the TorchTrainer to the end (resuming from `storage` if a checkpoint is there); returns
    {"checkpoint": a local copy of the final checkpoint, "history", "steps", "adapter" (sized JSON)}."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydapt.comblm.config import parse_fault

    config = {"model_dir": cfg.model, "adapter": adapter_json, "blocks": blocks, "original": original,
              "plan": plan, "lr": cfg.lr, "seed": cfg.seed, "checkpoint_every": cfg.checkpoint_every,
              "threads": max(1, int(cfg.cpus_per_worker)), "run": Path(cfg.output_dir).name,
              "kill_after_steps": parse_fault(cfg.fault_injection), "fault_marker": fault_marker}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="extend", storage_path=storage, failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        local = tempfile.mkdtemp(prefix="extend-final-")
        shutil.copytree(d, local, dirs_exist_ok=True)
    return {"checkpoint": local, "history": state["history"], "steps": state["step"], "adapter": state["adapter"]}
