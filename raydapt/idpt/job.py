"""An ID-PT (or static prompt) run from its config to its output directory.

The frozen large LM is served by a gray-box pool (`raydapt.graybox`); the prompt module lives here
and learns by Adam from the LM loss on the target tokens, back-propagated through the stages. Batch
t is drawn from every task's train split with a generator seeded by (seed, t), and a checkpoint
(module, Adam state, counters; signed) is written at every dev scoring, so a resumed run ends with
the bytes of an uninterrupted one. Scored by exact match: a generation is right when every target
token and the end token are the argmax given the gold prefix (what greedy decoding returns); a
classification task reads the argmax among its class words.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from raydapt.bbt.job import prepare_output_dir
from raydapt.config import to_dict
from raydapt.data.multitask import IGNORE, EncodedMulti, encode_multitask, load_multitask, select_tasks
from raydapt.data.multitask import exact_match as multitask_exact_match
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.graybox import FrozenLM, graybox_pool_spec, open_frozen_lm
from raydapt.idpt.config import RESULT_NEUTRAL_FIELDS
from raydapt.idpt.generator import PromptGenerator, StaticPrompt
from raydapt.models.checkpoint import load_tokenizer, model_info, optimizer_arrays, optimizer_state
from raydapt.outputs import (append_jsonl, load_checkpoint, progress_bar, read_jsonl, save_checkpoint, save_tensors,
                             truncate_jsonl, write_result)
from raydapt.serving import Runtime, pin_coordinator_threads

__all__ = ["run_idpt_job", "exact_match"]

CHECKPOINT_DIR = "checkpoint"
EVAL_ROWS = 64  # rows per scoring request: (rows, target tokens, vocabulary) logits come back


def run_idpt_job(cfg, runtime: Runtime) -> dict:
    started = time.perf_counter()
    pin_coordinator_threads()
    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")),
                              generator=cfg.generator or str(default_model_dir("small")))
    # Every input check before a worker starts.
    tokenizer = _check_tokenizers(cfg)
    multi = select_tasks(load_multitask(cfg.tasks_dir or None), cfg.task_names())
    info = model_info(cfg.model)
    data = {s: encode_multitask(tokenizer, multi, getattr(multi, s)) for s in ("train", "dev", "test")}
    longest = max(int(d.lengths.max()) for d in data.values())
    if longest + cfg.prompt_length > info.max_positions:
        raise UserError(f"--prompt-length {cfg.prompt_length}: with the longest input ({longest} tokens) the "
                        f"prompted sequence exceeds the model's context of {info.max_positions}")
    spec, fault = graybox_pool_spec(cfg)
    out, resuming = prepare_output_dir(cfg, RESULT_NEUTRAL_FIELDS)

    pool = runtime.open_pool(spec, fault)
    try:
        frozen, embedding_std = open_frozen_lm(pool, cfg, data["train"])
        torch.manual_seed(cfg.seed)
        module = _build_module(cfg, embedding_std, info.embed_dim)
        opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=cfg.lr)
        step = restore_checkpoint(out, module, opt) if resuming else 0
        reporter = runtime.trainer_reporter(f"{Path(out).parent.name}/{Path(out).name}")
        train_prompt_module(cfg, out, frozen, module, opt, data, multi, step, reporter)
        result = _finish(cfg, out, frozen, module, data, multi, started)
        if hasattr(pool, "fault_report"):
            result["fault_tolerance"] = pool.fault_report()
        result["oracle_usage"] = frozen.oracle.usage.as_dict()
        write_result(out, result)
        return result
    finally:
        runtime.close_pool(pool)


# --- inputs ------------------------------------------------------------------------------------------
def _check_tokenizers(cfg):
    """The large LM's tokenizer; the generator reads the same token ids, so its must be the same."""
    large, small = load_tokenizer(cfg.model, "model"), load_tokenizer(cfg.generator, "generator")
    if cfg.method == "idpt" and large.get_vocab() != small.get_vocab():
        raise UserError(f"--generator {cfg.generator}: its tokenizer differs from --model's; the generator reads "
                        "the same token ids, so give a small LM trained with the large LM's tokenizer")
    return large


def _build_module(cfg, embedding_std: float, width: int) -> torch.nn.Module:
    if cfg.method == "static":
        return StaticPrompt(cfg.prompt_length, width, embedding_std)
    from transformers import AutoModelForCausalLM

    encoder = AutoModelForCausalLM.from_pretrained(cfg.generator, dtype=torch.float32, use_safetensors=True)
    return PromptGenerator(encoder, cfg.prompt_length, cfg.soft_length, width, embedding_std)


def _sources(enc: EncodedMulti, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What the prompt module reads: each row's tokens before its target (never the answer)."""
    width = int(enc.target_start[rows].max())
    return torch.from_numpy(enc.input_ids[rows, :width]), torch.from_numpy(enc.target_start[rows])


# --- training ----------------------------------------------------------------------------------------
def _batch_rows(cfg, step: int, n: int) -> np.ndarray:
    return np.random.default_rng([cfg.seed, step]).choice(n, size=min(cfg.batch, n), replace=False)


def train_prompt_module(cfg, out: Path, frozen: FrozenLM, module, opt, data: dict, multi, step: int,
                        reporter) -> None:
    """Train `module` (it makes the prompt) through the frozen LM from `step` to cfg.steps, logging
    each step, scoring dev and checkpointing every cfg.eval_every steps. The frozen reader's job
    (raydapt.reader.job) trains its prompt with it too."""
    train, log_path = data["train"], out / "log.jsonl"
    truncate_jsonl(log_path, step)  # rows after the last checkpoint are redone
    module.train()
    with progress_bar(cfg.steps, step, out.name, unit="step") as bar:
        while step < cfg.steps:
            rows = _batch_rows(cfg, step, len(train.lengths))
            prompt = module(*_sources(train, rows))
            width = int(train.lengths[rows].max())
            answer = frozen(train.input_ids[rows, :width], train.lengths[rows], train.labels[rows, :width],
                            prompt=prompt)
            targets = int((train.labels[rows] != IGNORE).sum())
            loss = answer["loss"].sum() / targets
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            row = {"step": step, "train_loss": loss.item()}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                scores = exact_match(frozen, module, data["dev"], multi)
                row |= {"dev_exact_match": scores, "dev_average": float(np.mean(list(scores.values())))}
            append_jsonl(log_path, row)
            if "dev_average" in row:
                _checkpoint(out, module, opt, step)
                module.train()
            if reporter is not None:
                reporter.record(step, row["train_loss"])
            bar.update(1)
            bar.set_postfix(train_loss=f"{row['train_loss']:.4f}", refresh=False)
            if step % cfg.log_every == 0 or "dev_average" in row:
                dev = f" | dev exact match {row['dev_average']:.3f}" if "dev_average" in row else ""
                bar.write(f"step {step:4d}/{cfg.steps} | train loss {row['train_loss']:.4f}{dev}")


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _checkpoint(out: Path, module, opt, step: int) -> None:
    tensors, text = optimizer_arrays(opt.state_dict())
    save_checkpoint(out / CHECKPOINT_DIR, {
        "step": step, "module": {n: p.detach().numpy().copy() for n, p in _trainable(module).items()},
        "optimizer": {k: v.numpy() for k, v in tensors.items()}, "optimizer_rest": text})


def restore_checkpoint(out: Path, module, opt) -> int:
    """Load the last checkpoint under `out` into module and optimizer; the step it was taken at."""
    saved = load_checkpoint(out / CHECKPOINT_DIR)  # checks the signature, or refuses
    params = _trainable(module)
    if set(saved["module"]) != set(params):
        raise UserError(f"--resume: {out / CHECKPOINT_DIR} holds another module ({sorted(saved['module'])[:3]}...)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(saved["module"][name])))
    opt.load_state_dict(optimizer_state({k: torch.from_numpy(np.asarray(v)) for k, v in saved["optimizer"].items()},
                                        saved["optimizer_rest"]))
    return int(saved["step"])


# --- scoring -----------------------------------------------------------------------------------------
@torch.no_grad()
def exact_match(frozen: FrozenLM, module, enc: EncodedMulti, multi) -> dict[str, float]:
    """Per task, the fraction of rows answered exactly (module None: the hand-written prompt alone)."""
    if module is not None:
        module.eval()
    classes = _class_tokens(enc, multi)
    predicted = np.full(enc.input_ids.shape, -1, np.int64)  # argmax at position p - 1, for token p
    chosen = np.full(len(enc.lengths), -1, np.int64)       # a classification row's pick among its words
    for start in range(0, len(enc.lengths), EVAL_ROWS):
        rows = np.arange(start, min(start + EVAL_ROWS, len(enc.lengths)))
        prompt = None if module is None else module(*_sources(enc, rows))
        shift = 0 if prompt is None else prompt.shape[1]
        first, last = enc.target_start[rows], enc.lengths[rows]       # targets at [first, last)
        span = int((last - first).max())
        tokens = np.minimum(first[:, None] + np.arange(span)[None, :], (last - 1)[:, None])  # (n, K), last repeated
        width = int(last.max())
        logits = frozen(enc.input_ids[rows, :width], last, positions=tokens - 1 + shift, prompt=prompt)["logits"]
        predicted[rows[:, None], tokens - 1] = logits.argmax(-1).numpy()
        for task, words in enumerate(classes):
            here = enc.task[rows] == task
            if words is not None and here.any():
                chosen[rows[here]] = np.asarray(words)[logits[here, 0][:, words].argmax(-1).numpy()]
    right = multitask_exact_match(predicted, enc)
    gold_first = enc.input_ids[np.arange(len(enc.lengths)), enc.target_start]
    is_classification = np.isin(enc.task, [t for t, words in enumerate(classes) if words is not None])
    right[is_classification] = (chosen == gold_first)[is_classification]
    return {name: float(right[enc.task == t].mean()) for t, name in enumerate(multi.names)
            if (enc.task == t).any()}


def _class_tokens(enc: EncodedMulti, multi) -> list[list[int] | None]:
    """For a classification task, its class words (the first target tokens it has); else None."""
    first = enc.input_ids[np.arange(len(enc.lengths)), enc.target_start]
    return [sorted({int(x) for x in first[enc.task == t]}) if kind == "classification" else None
            for t, kind in enumerate(multi.kinds)]


def _finish(cfg, out: Path, frozen: FrozenLM, module, data: dict, multi, started: float) -> dict:
    test = exact_match(frozen, module, data["test"], multi)
    manual = exact_match(frozen, None, data["test"], multi)
    log = read_jsonl(out / "log.jsonl")
    meta = {"method": cfg.method, "model": cfg.model, "generator": cfg.generator if cfg.method == "idpt" else "",
            "prompt_length": str(cfg.prompt_length), "soft_length": str(cfg.soft_length),
            "tasks": json.dumps(multi.names)}
    save_tensors(out / "prompt_module.safetensors",
                 {n: p.detach().numpy() for n, p in _trainable(module).items()}, metadata=meta)
    plot_curve(out / "curve.png", log, f"{cfg.method}, seed {cfg.seed}")
    return {"method": cfg.method, "seed": cfg.seed, "tasks": multi.names,
            "kinds": dict(zip(multi.names, multi.kinds)),
            "test_exact_match": test, "test_average": float(np.mean(list(test.values()))),
            "manual_prompt_test_exact_match": manual, "manual_prompt_test_average": float(np.mean(list(manual.values()))),
            "dev_average": log[-1]["dev_average"], "final_train_loss": log[-1]["train_loss"],
            "trainable_parameters": sum(p.numel() for p in _trainable(module).values()),
            "n_train": len(data["train"].lengths), "n_dev": len(data["dev"].lengths), "n_test": len(data["test"].lengths),
            "wall_time_s": time.perf_counter() - started, "config": to_dict(cfg)}


def plot_curve(path: Path, log: list[dict], title: str) -> None:
    """Train loss per step and dev exact match at each evaluation, on two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4))
    left.plot([r["step"] for r in log], [r["train_loss"] for r in log], color="tab:blue", lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("train loss (per target token)", color="tab:blue")
    right = left.twinx()
    dev = [r for r in log if "dev_average" in r]
    right.plot([r["step"] for r in dev], [r["dev_average"] for r in dev], "o-", color="tab:red")
    right.set_ylabel("dev exact match, task average", color="tab:red")
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
