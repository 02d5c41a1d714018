"""Training the frozen reader's re-ranker with Ray Train: data-parallel `TorchTrainer` workers (DDP
over gloo on CPU), a checkpoint every few steps, and recovery from a killed worker (Ray Train
restarts the worker group from the latest checkpoint).

Results do not depend on failures: the questions of step t are a function of (seed, t) only, each
worker takes its slice, and a checkpoint holds the re-ranker, Adam's state and the loss history, so
a run that lost a worker ends with the weights and losses of one that did not.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from actors.train_checkpoint import inject_worker_fault, report_checkpoint, restore_checkpoint

__all__ = ["train_loop", "train_reranker"]

MODEL_FILE = "reranker.safetensors"


def _build(config: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from raydapt.reader.reranker import Reranker

    torch.manual_seed(config["seed"])
    lm = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=torch.float32, use_safetensors=True)
    model = Reranker(lm)
    return model, torch.optim.Adam(model.parameters(), lr=config["lr"])


def _restore(model, opt) -> tuple[int, list[float]]:
    from safetensors.torch import load_model

    state = restore_checkpoint(lambda d: load_model(model, os.path.join(d, MODEL_FILE)), opt)
    return (0, []) if state is None else (state["step"], state["losses"])


def _report(metrics: dict, model=None, opt=None, step: int = 0, losses=()) -> None:
    import ray.train
    from safetensors.torch import save_model

    if model is None:
        ray.train.report(metrics)
        return
    state = {"step": step, "losses": list(losses)}
    # save_model handles the LM's tied embeddings
    report_checkpoint(metrics, lambda d: save_model(model, os.path.join(d, MODEL_FILE)), opt, state, "reranker-ckpt-")


def train_loop(config: dict) -> None:
    """Ray Train's per-worker loop: each worker scores its slice of every step's question groups."""
    import ray.train
    import ray.train.torch
    import torch

    from raydapt.reader.reranker import PairTokens, group_loss

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, opt = _build(config)
    start, losses = _restore(model, opt)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP: gradients averaged each step
    tokens = PairTokens(**config["tokens"])
    rows, bm25 = np.asarray(config["rows"]), np.asarray(config["bm25"], np.float32)
    ddp.train()
    for step in range(start, config["steps"]):
        inject_worker_fault(config, step, rank, world)
        picked = np.random.default_rng([config["seed"], step]).choice(len(rows), config["batch"], replace=False)
        mine = picked[rank::world]
        loss = group_loss(ddp, tokens, mine, rows[mine], bm25[mine])  # DDP (or, alone, the model) forwards
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        done = step + 1
        if done % config["checkpoint_every"] == 0 or done == config["steps"]:
            _report({"step": done, "loss": losses[-1]}, *((model, opt, done, losses) if rank == 0 else ()))
            if rank == 0:
                sys.stderr.write(f"reranker step {done}/{config['steps']}: loss {losses[-1]:.4f} (checkpointed)\n")
                sys.stderr.flush()


def train_reranker(cfg, config: dict, storage: str, fault_marker: str) -> dict:
    """Run the TorchTrainer to the end (resuming from `storage` when a checkpoint is there) and return
    {"state": the re-ranker's tensors, "losses": per-step losses, "steps": n}."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from actors.cluster import init_ray

    init_ray()
    config = dict(config, fault_marker=fault_marker)
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.reranker_workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="reranker", storage_path=storage, failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        tensors = load_file(os.path.join(d, MODEL_FILE))
    return {"state": tensors, "losses": state["losses"], "steps": state["step"]}
