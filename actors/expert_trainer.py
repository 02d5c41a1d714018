"""Fine-tuning CombLM's small expert with Ray Train: data-parallel `TorchTrainer` workers (DDP over
gloo on CPU, NCCL on GPU), a checkpoint every few steps to the run's storage path, and recovery from
worker failures (Ray Train restarts the worker group from the latest checkpoint).

Results do not depend on failures: the rows of step t are a function of (seed, t) only, and a
checkpoint holds the weights, AdamW's state and the loss history, so a run that lost a worker ends
with the weights and losses of one that did not.
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
                                     restore_checkpoint)
from raydapt.models.checkpoint import HF_FILES

__all__ = ["train_loop", "fine_tune_expert"]


def _restore(model, opt, device) -> tuple[int, list[float]]:
    """Load the latest Ray Train checkpoint into model and optimizer; (next step, loss history)."""
    from safetensors.torch import load_file

    def load_weights(d: str) -> None:
        model.load_state_dict(load_file(os.path.join(d, "model.safetensors"), device=str(device)), strict=False)

    state = restore_checkpoint(load_weights, opt, device)
    return (0, []) if state is None else (state["step"], state["losses"])


def _report(metrics: dict, model=None, opt=None, tokenizer_dir: str = "", step: int = 0, losses=()) -> None:
    """ray.train.report, with (rank 0) a checkpoint: the HF checkpoint (weights, config, tokenizer)
    plus the optimizer's state and the counters."""
    import ray.train

    if model is None:
        ray.train.report(metrics)
        return

    def save_weights(d: str) -> None:
        model.save_pretrained(d, safe_serialization=True)
        for name in HF_FILES:
            src = Path(tokenizer_dir, name)
            if name.startswith(("tokenizer", "special")) and src.exists():
                shutil.copy(src, d)

    report_checkpoint(metrics, save_weights, opt, {"step": step, "losses": list(losses)}, "expert-ckpt-")


def train_loop(config: dict) -> None:
    """Ray Train's per-worker loop: each worker takes its slice of every global batch."""
    import ray.train
    import ray.train.torch
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from raydapt.pretrain import lr_at, step_rows

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=torch.float32, use_safetensors=True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0, betas=(0.9, 0.95))
    start, losses = _restore(model, opt, device)
    ddp = ray.train.torch.prepare_model(model)  # DDP: gradients averaged over workers each step
    blocks = torch.from_numpy(np.asarray(config["blocks"], dtype=np.int64))
    rows = step_rows(len(blocks), config["batch"], config["steps"], config["seed"])
    metrics = rank0_metrics(config["run"], rank)
    ddp.train()
    for step in range(start, config["steps"]):
        inject_worker_fault(config, step, rank, world)
        x = blocks[rows[step][rank::world]].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config["steps"], config["lr"], config["warmup"])
        loss = ddp(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        done = step + 1
        if metrics:
            metrics.record(done, losses[-1])
        if done % config["checkpoint_every"] == 0 or done == config["steps"]:
            metrics_row = {"step": done, "loss": losses[-1]}
            if rank == 0:
                _report(metrics_row, model, opt, config["model_dir"], done, losses)
            else:
                _report(metrics_row)
            if rank == 0:  # not print(): Ray Train V2 patches it to both log and echo, so each line came twice
                sys.stderr.write(f"expert step {done}/{config['steps']}: loss {losses[-1]:.4f} (checkpointed)\n")
                sys.stderr.flush()



def fine_tune_expert(cfg, blocks: np.ndarray, model_dir: str, storage: str, fault_marker: str) -> dict:
    """Run the TorchTrainer to the end (resuming from `storage` if a checkpoint is there) and return
    {"checkpoint": local dir of the final checkpoint, "losses": per-step losses, "failures": n}."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.cluster import init_ray
    from raydapt.comblm.config import parse_fault

    init_ray()
    config = {"model_dir": model_dir, "blocks": blocks, "batch": cfg.expert_batch, "steps": cfg.expert_steps,
              "lr": cfg.expert_lr, "warmup": 0.05, "seed": cfg.seed, "checkpoint_every": cfg.checkpoint_every,
              "threads": max(1, int(cfg.cpus_per_worker)), "run": Path(cfg.output_dir).name,
              "kill_after_steps": parse_fault(cfg.fault_injection), "fault_marker": fault_marker}
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="expert", storage_path=storage,
                             failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")))  # progress: our own line per checkpoint
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        local = tempfile.mkdtemp(prefix="expert-final-")
        shutil.copytree(d, local, dirs_exist_ok=True)
    return {"checkpoint": local, "losses": state["losses"], "steps": state["step"]}
