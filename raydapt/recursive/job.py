"""A recursive-LM run from its config to its output directory (Levine et al., 2022, section 5).

Phases, one global step counter through them (`RecursiveConfig.phases`):
1. first: pass 1's soft prompt learns the task (this alone is --method one_pass);
2. pretrain (neural): the connector learns language modelling on general text, pass 1 reading a
   window's first part and pass 2 predicting the rest from the connector's vectors alone;
3. second: pass 2's prompt (and the connector) learn the task, pass 1 frozen. What pass 1 hands
   over (sampled answers, or final states) is computed once from its prompt at the phase's start.

Every loss and gradient goes through the frozen LM's gray-box pool (`raydapt.graybox.FrozenLM`).
Batches are drawn with generators seeded by (seed, phase, step) and a signed checkpoint (modules,
the phase's Adam state, the step) is written at every evaluation, so a resumed run ends with the
bytes of an uninterrupted one. Scored by exact match: the target's tokens and the end token are
each the argmax given the gold prefix (what greedy decoding returns).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from raydapt.bbt.job import check_resume_config, prepare_output_dir
from raydapt.config import to_dict
from raydapt.data.multitask import (IGNORE, SPLITS, EncodedMulti, encode_multitask, end_token_id, load_multitask,
                                    select_tasks)
from raydapt.data.multitask import exact_match as multitask_exact_match
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.graybox import FrozenLM, graybox_pool_spec, open_frozen_lm
from raydapt.models.checkpoint import load_tokenizer, model_info, optimizer_arrays, optimizer_state
from raydapt.outputs import (append_jsonl, load_checkpoint, progress_bar, read_jsonl, save_checkpoint, save_tensors,
                             truncate_jsonl, write_result)
from raydapt.recursive.config import RESULT_NEUTRAL_FIELDS
from raydapt.recursive.connector import RecursiveLM
from raydapt.recursive.passes import last_states, sample_answers, source_tokens, text_windows, with_answers
from raydapt.serving import Runtime, pin_coordinator_threads

__all__ = ["run_recursive_job"]

CHECKPOINT_DIR = "checkpoint"
EVAL_ROWS = 64
MARKER = "#"           # an answer line pass 2 reads: "# ))\n", a comment above the input
GENERAL_FILES = 10     # pre-training text: every 10th file of the LM's own pre-training part
HELD_WINDOWS = 64      # windows kept apart to measure the connector's pre-training


@dataclasses.dataclass
class _Context:
    """What every phase reads: the config, the frozen LM, the modules and the data."""
    cfg: object
    out: Path
    frozen: FrozenLM
    model: RecursiveLM
    data: dict[str, EncodedMulti]
    windows: np.ndarray | None   # (n, context + continuation) general-text tokens (neural)
    end_id: int
    pad_id: int
    marker: list[int]
    reporter: object = None


def run_recursive_job(cfg, runtime: Runtime) -> dict:
    started = time.perf_counter()
    pin_coordinator_threads()
    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")))
    # Every input check before a worker starts; the cheap one first.
    check_resume_config(cfg, RESULT_NEUTRAL_FIELDS)
    tokenizer = load_tokenizer(cfg.model)
    multi = _select_task(load_multitask(cfg.tasks_dir or None), cfg.task)
    info = model_info(cfg.model)
    data = {s: encode_multitask(tokenizer, multi, getattr(multi, s)) for s in SPLITS}
    marker = tokenizer.encode(MARKER, add_special_tokens=False)
    _check_lengths(cfg, data, info.max_positions, len(marker))
    windows = _general_text(cfg, tokenizer) if cfg.method == "neural" else None
    spec, fault = graybox_pool_spec(cfg)
    out, resuming = prepare_output_dir(cfg, RESULT_NEUTRAL_FIELDS)

    pool = runtime.open_pool(spec, fault)
    try:
        frozen, embedding_std = open_frozen_lm(pool, cfg, data["train"])
        torch.manual_seed(cfg.seed)
        model = RecursiveLM(cfg.method, cfg.prompt_length, info.embed_dim, embedding_std, cfg.connector_width)
        step, saved_optimizer = _restore(out, model) if resuming else (0, None)
        ctx = _Context(cfg, out, frozen, model, data, windows, end_token_id(tokenizer), tokenizer.pad_token_id, marker,
                       runtime.trainer_reporter(f"{Path(out).parent.name}/{Path(out).name}"))
        handover = _train(ctx, step, saved_optimizer)
        result = _finish(ctx, handover, tokenizer, started)
        if hasattr(pool, "fault_report"):
            result["fault_tolerance"] = pool.fault_report()
        result["oracle_usage"] = frozen.oracle.usage.as_dict()
        write_result(out, result)
        return result
    finally:
        runtime.close_pool(pool)


# --- inputs ------------------------------------------------------------------------------------------
def _select_task(multi, name: str):
    generation = [n for n, kind in zip(multi.names, multi.kinds) if kind == "generation"]
    if name not in generation:
        what = "is a classification task" if name in multi.names else "unknown task"
        raise UserError(f"--task {name!r}: {what}; accepted (generation tasks): {', '.join(generation)}")
    return select_tasks(multi, [name])


def _check_lengths(cfg, data: dict, context: int, marker: int) -> None:
    """The longest sequence either pass can meet fits the model's context; pass 1 has m states."""
    longest = max(int(d.lengths.max()) for d in data.values())
    extra = {"one_pass": 0, "textual": cfg.samples * (marker + cfg.max_new_tokens + 1)}.get(cfg.method, cfg.states)
    if longest + cfg.prompt_length + extra > context:
        what = f" and {extra} positions of pass 1's answers or states" if extra else ""
        raise UserError(f"--prompt-length {cfg.prompt_length}: with the longest input ({longest} tokens){what} the "
                        f"prompted sequence exceeds the model's context of {context}")
    shortest = min(int(d.target_start.min()) for d in data.values())
    if cfg.method.startswith("neural") and cfg.states > shortest:
        raise UserError(f"--states {cfg.states}: the shortest input has {shortest} tokens before its answer")
    if cfg.method == "neural" and cfg.states + cfg.pretrain_continuation > context:
        raise UserError(f"--pretrain-continuation {cfg.pretrain_continuation}: with --states {cfg.states} it "
                        f"exceeds the model's context of {context}")
    if cfg.method == "neural" and cfg.pretrain_context > context:
        raise UserError(f"--pretrain-context {cfg.pretrain_context} exceeds the model's context of {context}")
    if cfg.method == "neural" and cfg.states > cfg.pretrain_context:
        raise UserError(f"--states {cfg.states} exceeds --pretrain-context {cfg.pretrain_context}")


def _general_text(cfg, tokenizer) -> np.ndarray:
    """Windows of the LM's own pre-training text: enough for every pre-training step, plus a held set."""
    from raydapt.data.corpus import load_corpus, read_text

    corpus = load_corpus()
    texts = (t for t in (read_text(corpus.root / f) for f in corpus.pretrain[::GENERAL_FILES]) if t)
    need = cfg.pretrain_batch * cfg.pretrain_steps + HELD_WINDOWS
    windows = text_windows(tokenizer, texts, cfg.pretrain_context + cfg.pretrain_continuation, need)
    if len(windows) < HELD_WINDOWS + cfg.pretrain_batch:
        raise UserError(f"--pretrain-context/--pretrain-continuation: only {len(windows)} windows of general text")
    return windows


# --- training ----------------------------------------------------------------------------------------
def _rows(cfg, phase: int, step: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng([cfg.seed, phase, step]).choice(n, size=min(size, n), replace=False)


def _train(ctx: _Context, step: int, saved_optimizer) -> dict:
    """Run the phases from global `step`; returns what pass 1 hands pass 2 (empty for one pass)."""
    cfg, log_path = ctx.cfg, ctx.out / "log.jsonl"
    truncate_jsonl(log_path, step)  # rows after the last checkpoint are redone
    phases, begin, handover = cfg.phases(), 0, {}
    with progress_bar(sum(n for _, n in phases), step, ctx.out.name, unit="step") as bar:
        for index, (phase, n) in enumerate(phases):
            end = begin + n
            if phase == "second":  # needed for scoring even when the phase was finished before a resume
                handover = _handover(ctx)
            if step < end:
                opt = torch.optim.Adam(ctx.model.trainable(phase), lr=cfg.lr)
                if saved_optimizer is not None and saved_optimizer[0] == phase:
                    opt.load_state_dict(saved_optimizer[1])
                step = _run_phase(ctx, phase, index, begin, end, step, opt, handover, bar, log_path)
            begin = end
    return handover


def _run_phase(ctx, phase: str, index: int, begin: int, end: int, step: int, opt, handover: dict, bar,
               log_path: Path) -> int:
    cfg = ctx.cfg
    ctx.model.train()
    while step < end:
        loss = _loss(ctx, phase, handover, _rows(cfg, index, step - begin, *_pool_size(ctx, phase)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        row = {"step": step, "phase": phase, "train_loss": loss.item()}
        evaluated = (step - begin) % cfg.eval_every == 0 or step == end
        if evaluated:
            row |= _evaluate(ctx, phase, handover)
        append_jsonl(log_path, row)
        if evaluated:  # after the row: a checkpoint never counts a row the log lacks
            _checkpoint(ctx.out, ctx.model, opt, phase, step)
        if ctx.reporter is not None:
            ctx.reporter.record(step, row["train_loss"])
        bar.update(1)
        bar.set_postfix(phase=phase, train_loss=f"{row['train_loss']:.4f}", refresh=False)
        if step % cfg.log_every == 0 or evaluated:
            scores = "".join(f" | {k} {v:.3f}" for k, v in row.items() if k.startswith(("dev", "held")))
            bar.write(f"step {step:4d} ({phase}) | train loss {row['train_loss']:.4f}{scores}")
    return step


def _pool_size(ctx, phase: str) -> tuple[int, int]:
    """(rows to draw from, rows per batch) for a phase."""
    if phase == "pretrain":
        return len(ctx.windows) - HELD_WINDOWS, ctx.cfg.pretrain_batch
    return len(ctx.data["train"].lengths), ctx.cfg.batch


def _loss(ctx: _Context, phase: str, handover: dict, rows: np.ndarray) -> torch.Tensor:
    """Mean loss per predicted token of one batch, through the frozen LM."""
    if phase == "pretrain":
        return _pretrain_loss(ctx, ctx.windows[HELD_WINDOWS:][rows])
    enc = handover["train"] if phase == "second" and ctx.cfg.method == "textual" else ctx.data["train"]
    prompt = _prompt(ctx, phase, handover, "train", rows)
    width = int(enc.lengths[rows].max())
    answer = ctx.frozen(enc.input_ids[rows, :width], enc.lengths[rows], enc.labels[rows, :width], prompt=prompt)
    return answer["loss"].sum() / int((enc.labels[rows] != IGNORE).sum())


def _prompt(ctx: _Context, phase: str, handover: dict, split: str, rows: np.ndarray) -> torch.Tensor:
    """The prompt in front of a batch: pass 1's, or pass 2's (with the connector's vectors if neural)."""
    if phase == "first":
        return ctx.model.first.prompt.expand(len(rows), -1, -1)
    states = handover.get(f"{split}_states")
    return ctx.model.second_prompt(len(rows), None if states is None else states[rows])


def _pretrain_loss(ctx: _Context, windows: np.ndarray) -> torch.Tensor:
    """Pass 1 reads a window's first part; the connector maps its last m states; pass 2 predicts the
    rest from those vectors alone (without them it could not know the context)."""
    cfg, rows = ctx.cfg, len(windows)
    context, rest = windows[:, : cfg.pretrain_context], windows[:, cfg.pretrain_context:]
    with torch.no_grad():  # pass 1 is fixed: no gradient reaches its (prompt-less) input
        hidden = ctx.frozen(context, np.full(rows, cfg.pretrain_context), hidden=True)["hidden"]
    states = last_states(hidden, np.full(rows, cfg.pretrain_context), cfg.states)
    answer = ctx.frozen(rest, np.full(rows, rest.shape[1]), rest, prompt=ctx.model.connector(states))
    return answer["loss"].sum() / (rows * rest.shape[1])


@torch.no_grad()
def _handover(ctx: _Context) -> dict:
    """What pass 1 (its trained prompt) gives pass 2, for every split: pass-2 rows with k sampled
    answers (textual), or the last m final states (neural)."""
    cfg, out = ctx.cfg, {}
    prompt = ctx.model.first.prompt.detach()
    for index, split in enumerate(SPLITS):
        enc = ctx.data[split]
        ids, lengths = source_tokens(enc, np.arange(len(enc.lengths)))
        if cfg.method == "textual":
            answers = sample_answers(ctx.frozen, ids, lengths, prompt, cfg.samples, cfg.max_new_tokens,
                                     cfg.temperature, ctx.end_id, [cfg.seed, index, 7])
            out[split] = with_answers(enc, answers, cfg.samples, ctx.marker, ctx.end_id, ctx.pad_id)
            out[f"{split}_answers"] = answers
        else:
            states = []
            for start in range(0, len(lengths), EVAL_ROWS):
                part = slice(start, start + EVAL_ROWS)
                width = int(lengths[part].max())
                hidden = ctx.frozen(ids[part, :width], lengths[part], prompt=prompt.expand(len(lengths[part]), -1, -1),
                                    hidden=True)["hidden"]
                states.append(last_states(hidden, lengths[part] + prompt.shape[0], cfg.states))
            out[f"{split}_states"] = torch.cat(states)
    return out


# --- scoring -----------------------------------------------------------------------------------------
def _evaluate(ctx: _Context, phase: str, handover: dict) -> dict:
    if phase == "pretrain":
        return {"held_out_lm_loss": _held_out_lm_loss(ctx)}
    return {"dev_exact_match": float(_correct(ctx, phase, handover, "dev").mean())}


@torch.no_grad()
def _held_out_lm_loss(ctx: _Context) -> float:
    ctx.model.eval()
    loss = _pretrain_loss(ctx, ctx.windows[:HELD_WINDOWS]).item()
    ctx.model.train()
    return loss


@torch.no_grad()
def _correct(ctx: _Context, phase: str, handover: dict, split: str) -> np.ndarray:
    """(N,) bool: each row of `split` answered exactly by pass 1 (phase "first") or pass 2."""
    enc = handover[split] if phase == "second" and ctx.cfg.method == "textual" else ctx.data[split]
    predicted = np.full(enc.input_ids.shape, -1, np.int64)  # argmax at position p - 1, for token p
    for start in range(0, len(enc.lengths), EVAL_ROWS):
        rows = np.arange(start, min(start + EVAL_ROWS, len(enc.lengths)))
        prompt = _prompt(ctx, phase, handover, split, rows)
        first, last = enc.target_start[rows], enc.lengths[rows]  # targets at [first, last)
        span = int((last - first).max())
        tokens = np.minimum(first[:, None] + np.arange(span)[None, :], (last - 1)[:, None])
        logits = ctx.frozen(enc.input_ids[rows, : int(last.max())], last, positions=tokens - 1 + prompt.shape[1],
                            prompt=prompt)["logits"]
        predicted[rows[:, None], tokens - 1] = logits.argmax(-1).numpy()
    return multitask_exact_match(predicted, enc)


def _answer_checks(ctx: _Context, handover: dict) -> dict:
    """Textual: how often one of pass 1's k answers is right, and how often their majority vote is."""
    enc, k = ctx.data["test"], ctx.cfg.samples
    answers = handover["test_answers"]
    gold = [tuple(enc.input_ids[i, enc.target_start[i]: enc.lengths[i]]) for i in range(len(enc.lengths))]
    mine = [[tuple(a) for a in answers[i * k:(i + 1) * k]] for i in range(len(gold))]
    vote = [Counter(a).most_common(1)[0][0] for a in mine]  # ties: the first sampled
    return {"any_answer_test_exact_match": float(np.mean([g in a for g, a in zip(gold, mine)])),
            "majority_vote_test_exact_match": float(np.mean([g == v for g, v in zip(gold, vote)]))}


# --- checkpoints and results -------------------------------------------------------------------------
def _trainable(model: RecursiveLM) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _checkpoint(out: Path, model: RecursiveLM, opt, phase: str, step: int) -> None:
    tensors, text = optimizer_arrays(opt.state_dict())
    save_checkpoint(out / CHECKPOINT_DIR, {
        "step": step, "phase": phase,
        "module": {n: p.detach().numpy().copy() for n, p in _trainable(model).items()},
        "optimizer": {k: v.numpy() for k, v in tensors.items()}, "optimizer_rest": text})


def _restore(out: Path, model: RecursiveLM) -> tuple[int, tuple[str, dict]]:
    saved = load_checkpoint(out / CHECKPOINT_DIR)  # checks the signature, or refuses
    params = _trainable(model)
    if set(saved["module"]) != set(params):
        raise UserError(f"--resume: {out / CHECKPOINT_DIR} holds other modules ({sorted(saved['module'])[:3]}...)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(saved["module"][name])))
    state = optimizer_state({k: torch.from_numpy(np.asarray(v)) for k, v in saved["optimizer"].items()},
                            saved["optimizer_rest"])
    return int(saved["step"]), (str(saved["phase"]), state)


def _finish(ctx: _Context, handover: dict, tokenizer, started: float) -> dict:
    cfg, out = ctx.cfg, ctx.out
    ctx.model.eval()
    first = _correct(ctx, "first", handover, "test")
    final = first if cfg.method == "one_pass" else _correct(ctx, "second", handover, "test")
    log = read_jsonl(out / "log.jsonl")
    dev = [r["dev_exact_match"] for r in log if "dev_exact_match" in r]
    meta = {"method": cfg.method, "model": cfg.model, "task": cfg.task, "prompt_length": str(cfg.prompt_length),
            "states": str(cfg.states), "marker": MARKER}
    save_tensors(out / "modules.safetensors", {n: p.detach().numpy() for n, p in _trainable(ctx.model).items()},
                 metadata=meta)
    if cfg.method == "textual":
        _write_answers(out / "test_answers.jsonl", handover["test_answers"], cfg.samples, tokenizer)
    _plot(out / "curve.png", log, f"{cfg.method}, seed {cfg.seed}, {cfg.task}")
    held = [r["held_out_lm_loss"] for r in log if "held_out_lm_loss" in r]
    result = {"method": cfg.method, "seed": cfg.seed, "task": cfg.task,
              "test_exact_match": float(final.mean()), "first_pass_test_exact_match": float(first.mean()),
              "test_correct": final.astype(int).tolist(), "first_pass_test_correct": first.astype(int).tolist(),
              "dev_exact_match": dev[-1], "final_train_loss": log[-1]["train_loss"],
              "connector_held_out_lm_loss": held[-1] if held else None,
              "trainable_parameters": sum(p.numel() for p in _trainable(ctx.model).values()),
              "n_train": len(ctx.data["train"].lengths), "n_test": len(ctx.data["test"].lengths),
              "wall_time_s": time.perf_counter() - started, "config": to_dict(cfg)}
    if cfg.method == "textual":
        result |= _answer_checks(ctx, handover)
    return result


def _write_answers(path: Path, answers: list[list[int]], k: int, tokenizer) -> None:
    """Pass 1's sampled answers per test row, as text: what pass 2 read."""
    path.write_text("".join(json.dumps({"row": i, "answers": [tokenizer.decode(a) for a in answers[i * k:(i + 1) * k]]})
                            + "\n" for i in range(len(answers) // k)))


def _plot(path: Path, log: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4))
    for phase, color in (("first", "tab:blue"), ("pretrain", "tab:gray"), ("second", "tab:green")):
        rows = [r for r in log if r["phase"] == phase]
        if rows:
            left.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], color=color, lw=0.8,
                      label=f"{phase} (train loss)")
    left.set_xlabel("step (all phases)")
    left.set_ylabel("loss per predicted token")
    left.legend(loc="upper left", fontsize=8)
    right = left.twinx()
    dev = [r for r in log if "dev_exact_match" in r]
    right.plot([r["step"] for r in dev], [r["dev_exact_match"] for r in dev], "o", color="tab:red")
    right.set_ylabel("dev exact match", color="tab:red")
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
