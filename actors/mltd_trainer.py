"""Meta-training for MLtD with Ray Train: first-order MAML (or the multitask control) over the
meta-train domains, the tasks of each meta-batch spread over the `TorchTrainer` workers and their
outer gradients summed by one all-reduce (raydapt.mltd.maml: bit-identical for 1 and 2 workers), a
checkpoint every few meta-steps, a killed worker restarted from the last one.

A checkpoint holds every outer parameter (`mltd.safetensors`: backbone, TARP, TAMS), Adam's state
(safetensors + JSON, no pickle) and the loss history. Meta-step t's tasks and rows are functions of
(seed, t), so a run that lost a worker ends with the numbers of one that did not.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from actors.train_checkpoint import (inject_worker_fault, rank0_metrics, report_checkpoint,
                                     restore_trainable)

__all__ = ["train_loop", "meta_train"]

WEIGHTS_FILE = "mltd.safetensors"


def _report(outer, opt, history: list[dict], step: int) -> None:
    from safetensors.torch import save_file

    def save_weights(d: str) -> None:
        save_file({n: p.detach().contiguous().clone().cpu() for n, p in outer}, os.path.join(d, WEIGHTS_FILE))

    report_checkpoint(history[-1], save_weights, opt, {"step": step, "history": history}, "mltd-ckpt-")


def train_loop(config: dict) -> None:
    """Ray Train's per-worker loop: worker `rank` computes positions rank::world of every meta-batch."""
    import ray.train
    import ray.train.torch
    import torch

    from raydapt.mltd.adapt import build_model
    from raydapt.mltd.config import MLtDConfig
    from raydapt.mltd.maml import Task, apply_outer, meta_gradient_rows, outer_optimizer, outer_parameters

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = MLtDConfig(**config["cfg"])
    model = build_model(config["model_dir"], cfg, cfg.seed, meta=True)
    outer = outer_parameters(model, cfg.base_lr > 0)
    params = [p for _, p in outer]
    opt = outer_optimizer(model, cfg.outer_lr, cfg.base_lr)
    start, history = restore_trainable(model, opt, "cpu", WEIGHTS_FILE)
    tasks = [Task(name, torch.tensor(train), torch.tensor(test)) for name, train, test in config["tasks"]]
    mode = "multitask" if cfg.method == "multitask" else "maml"
    metrics = rank0_metrics(config["run"], rank)
    for step in range(start, cfg.meta_steps):
        inject_worker_fault(config, step, rank, world)
        buffer = meta_gradient_rows(model, params, tasks, cfg.seed, step, range(rank, cfg.meta_batch, world),
                                    cfg.meta_batch, cfg.inner_steps, cfg.inner_batch, cfg.inner_lr, mode)
        if world > 1:
            torch.distributed.all_reduce(buffer)  # a sum: every row has one nonzero contributor
        loss = apply_outer(params, opt, buffer)
        done = step + 1
        history.append({"step": done, "outer_loss": loss})
        if metrics:
            metrics.record(done, loss)
        if done % cfg.checkpoint_every == 0 or done == cfg.meta_steps:
            if rank == 0:
                _report(outer, opt, history, done)
                sys.stderr.write(f"mltd {cfg.method} meta-step {done}/{cfg.meta_steps}: outer loss {loss:.4f} "
                                 "(checkpointed)\n")
                sys.stderr.flush()
            else:
                ray.train.report(history[-1])



def meta_train(cfg, cfg_dict: dict, tasks: list, storage: str, fault_marker: str) -> dict:
    """Run the TorchTrainer to the end (resuming from `storage` if a checkpoint is there); returns
    {"checkpoint": a local copy of the final checkpoint, "history", "steps"}."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydapt.comblm.config import parse_fault

    config = {"model_dir": cfg.model, "cfg": cfg_dict, "tasks": tasks, "threads": max(1, int(cfg.cpus_per_worker)),
              "run": Path(cfg.output_dir).name, "kill_after_steps": parse_fault(cfg.fault_injection),
              "fault_marker": fault_marker}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=False,  # the buffer is all-reduced by gloo
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="mltd", storage_path=storage, failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        local = tempfile.mkdtemp(prefix="mltd-final-")
        shutil.copytree(d, local, dirs_exist_ok=True)
    return {"checkpoint": local, "history": state["history"], "steps": state["step"]}
