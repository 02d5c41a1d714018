"""White-box gradient prompt tuning of the same prompt BBT searches: BBT's upper reference.

The prompt (L placeholder slots, "add" mode, encoded exactly as for BBT) is learned by Adam through
the frozen model in this process (`raydapt.gradient_prompt`); the white box is the point here.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydapt.bbt.config import TaskConfig
from raydapt.bbt.inputs import check_label_words, encode_task, load_configured_task
from raydapt.bbt.losses import accuracy
from raydapt.config import check, field, to_dict
from raydapt.errors import UserError
from raydapt.gradient_prompt import prompted_label_logits, tune_prompt
from raydapt.outputs import announce_output, read_json, save_tensors, write_json, write_result

__all__ = ["GradientConfig", "run_gradient_job"]


@dataclass
class GradientConfig(TaskConfig):
    """Gradient prompt tuning on the white-box large LM (the upper reference for BBT)."""
    prompt_length: int = field(10, "L: prompt tokens (placeholder slots, as BBT's add mode)")
    steps: int = field(200, "Adam steps on the few-shot train set")
    lr: float = field(0.01, "Adam learning rate")
    output_dir: str = field("runs/gradient", "where result.json and the prompt go")

    def __post_init__(self):
        super().__post_init__()
        check(self.prompt_length >= 1, "prompt_length", f"must be >= 1, got {self.prompt_length}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


def _check_model(model: str):
    """The --model directory: a supported checkpoint with safetensors weights and a tokenizer."""
    from raydapt.models.checkpoint import load_tokenizer, read_config, tensor_index

    try:
        read_config(model)
        tensor_index(model)  # opens every safetensors header: a corrupted file fails here, not mid-load
    except UserError as e:
        raise UserError(f"--model: {e}")
    return load_tokenizer(model)


def _prepare_output_dir(cfg) -> Path:
    """Refuse a directory that holds a finished run or another config's run; else write config.json.

    The run has no checkpoint: an unfinished run of the same config (config.json, no result.json)
    simply starts again, and result.json, written last, marks the directory finished. So a rerun
    never leaves a new prompt beside an old result.
    """
    out = Path(cfg.output_dir)
    if (out / "result.json").exists():
        raise UserError(f"--output-dir {out} already holds a finished run (result.json); choose another "
                        "directory or delete that one")
    if (out / "config.json").exists() and read_json(out / "config.json") != to_dict(cfg):
        raise UserError(f"--output-dir {out} holds an unfinished run of a different config (config.json); "
                        "choose another directory or delete that one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be created ({e.strerror})")
    write_json(out / "config.json", to_dict(cfg))
    announce_output(out)
    return out


def run_gradient_job(cfg: GradientConfig) -> dict:
    from transformers import AutoModelForCausalLM

    from raydapt.defaults import default_model_dir

    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")))
    started = time.perf_counter()
    # Every input check before the model loads: a bad flag costs a second.
    tokenizer = _check_model(cfg.model)
    task = load_configured_task(cfg)
    check_label_words(tokenizer, task)
    out = _prepare_output_dir(cfg)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, use_safetensors=True).eval()
    data = encode_task(task, tokenizer, cfg.prompt_length, "add", model.config.max_position_embeddings,
                       cfg.placeholder)
    prompt = tune_prompt(model, data.train.input_ids, data.train.lengths, data.train.labels, data.label_ids,
                         cfg.prompt_length, cfg.steps, cfg.lr, cfg.seed)

    def acc(split, p):
        logits = prompted_label_logits(model, split.input_ids, split.lengths, p, data.label_ids)
        return float(accuracy(logits.numpy(), split.labels))

    save_tensors(out / "best_prompt.safetensors", {"prompt": prompt.numpy().astype(np.float32)})
    result = {"method": "gradient", "optimizer": "adam", "seed": cfg.seed, "api_calls": 0,
              "train_accuracy": acc(data.train, prompt), "dev_accuracy": acc(data.dev, prompt),
              "test_accuracy": acc(data.test, prompt), "manual_prompt_test_accuracy": acc(data.manual_test, None),
              "wall_time_s": time.perf_counter() - started, "config": to_dict(cfg)}
    write_result(out, result)
    return result
