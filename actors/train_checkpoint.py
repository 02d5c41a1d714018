"""What every Ray Train loop of raydapt (expert, extension, MLtD, re-ranker) does the same way: rank 0
reports the metrics; a checkpoint is a directory of the trained weights, the optimizer's state and
the counters (state.json), written without pickle; a run restores its last one; and `kill-worker:after-steps=N`
kills one worker once, to show that a restart from the last checkpoint changes nothing."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from raydapt.models.checkpoint import load_optimizer_state, save_optimizer_state

__all__ = ["OPTIMIZER_FILE", "rank0_metrics", "inject_worker_fault", "report_checkpoint", "restore_checkpoint",
           "restore_trainable"]

OPTIMIZER_FILE = "optimizer.safetensors"  # AdamW's / Adam's state (raydapt.models.checkpoint)


def rank0_metrics(run: str, rank: int):
    """The loop's Ray metrics (actors.metrics.TrainerMetrics), reported by rank 0 only: None elsewhere."""
    if rank != 0:
        return None
    from actors.metrics import TrainerMetrics
    return TrainerMetrics(run)


def inject_worker_fault(config: dict, step: int, rank: int, world: int) -> None:
    """kill-worker:after-steps=N: the last rank dies hard once, on reaching step N (the marker file
    makes it once per run, across restarts)."""
    after, marker = config.get("kill_after_steps"), config.get("fault_marker")
    if after is None or step != after or rank != world - 1 or Path(marker).exists():
        return
    Path(marker).write_text(f"killed rank {rank} at step {step}\n")
    os._exit(1)


def report_checkpoint(metrics: dict, save_weights: Callable[[str], None], opt, state: dict, prefix: str) -> None:
    """ray.train.report with a checkpoint: save_weights(dir) writes the weights, then the optimizer and
    state.json. Ray Train copies the directory to the run's storage; the local one goes after."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        save_weights(d)
        save_optimizer_state(opt.state_dict(), os.path.join(d, OPTIMIZER_FILE))
        Path(d, "state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def restore_checkpoint(load_weights: Callable[[str], None], opt, device="cpu") -> dict | None:
    """The run's last checkpoint, if any: load_weights(dir) and the optimizer's state are loaded, and
    its state.json returned; None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        load_weights(d)
        opt.load_state_dict(load_optimizer_state(os.path.join(d, OPTIMIZER_FILE), device))
        return json.loads(Path(d, "state.json").read_text())


def restore_trainable(model, opt, device, weights_file: str) -> tuple[int, list[dict]]:
    """For loops that checkpoint only the trainable tensors (raydapt.adapters.trainable_state) and a
    history: (next step, history), (0, []) on a fresh start."""
    from safetensors.torch import load_file

    from raydapt.adapters import load_trainable

    def load_weights(d: str) -> None:
        load_trainable(model, load_file(os.path.join(d, weights_file), device=str(device)))

    state = restore_checkpoint(load_weights, opt, device)
    return (0, []) if state is None else (state["step"], state["history"])
