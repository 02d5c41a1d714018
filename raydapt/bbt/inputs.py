"""The few-shot task, encoded once for the oracle: token ids, lengths, labels, label-word ids."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydapt.data.tasks import (Task, check_label_ids, default_task, encode_examples, few_shot, label_names,
                                label_token_ids, load_task_file)
from raydapt.errors import UserError

__all__ = ["Split", "EncodedTask", "load_configured_task", "check_label_words", "encode_task", "encode_texts",
           "placeholder_ids"]


@dataclass(frozen=True)
class Split:
    input_ids: np.ndarray  # (N, T) int64, right-padded
    lengths: np.ndarray    # (N,)
    labels: np.ndarray     # (N,)


@dataclass(frozen=True)
class EncodedTask:
    train: Split
    dev: Split
    test: Split
    manual_test: Split     # the hand-written template alone, without prompt slots
    label_ids: list[int]
    prompt_offset: int     # prompt slots start here (add mode) / the prompt is inserted here (cat)
    verbalizer: tuple[str, ...] = ()          # class k's label word
    label_names: tuple[str, ...] | None = None  # class k's name in the task file (string labels)
    template: str = ""                        # the task's template, "{text}" marking the input


def load_configured_task(cfg) -> Task:
    """The built-in task, or a user's file with its template and verbalizer.

    Label ids come from one mapping, the task file's: --test-file is numbered by it (never by its
    own labels, which could order them differently or lack one) and refused if it holds labels the
    task file lacks; --verbalizer must have one word per class of the task file. All of it is
    checked here, before any model loads or any actor starts.
    """
    if not cfg.task:
        return default_task(seed=cfg.seed, k=cfg.k_shot)

    try:
        pool = load_task_file(cfg.task, cfg.text_column, cfg.label_column)
    except UserError as e:
        raise UserError(f"--task: {e}")
    words = cfg.label_words()
    names = label_names(pool)
    if names is not None and len(names) != len(words):
        raise UserError(f"--verbalizer: {len(words)} words for the {len(names)} classes of --task; give one "
                        f"word per class, in the labels' sorted order: {', '.join(names)}")
    try:
        check_label_ids(pool["label"], len(words), cfg.task, exact=True)
    except UserError as e:
        raise UserError(f"--verbalizer: {len(words)} words do not match --task's classes ({e})")
    try:
        train, dev = few_shot(pool, cfg.k_shot, cfg.seed)
    except UserError as e:
        raise UserError(f"--k-shot {cfg.k_shot}: {e}")
    if cfg.test_file:
        try:
            test = load_task_file(cfg.test_file, cfg.text_column, cfg.label_column, like=pool)
            check_label_ids(test["label"], len(words), cfg.test_file, exact=False)
        except UserError as e:
            raise UserError(f"--test-file: {e}")
    else:
        used = set(train["text"]) | set(dev["text"])
        test = pool.select([i for i, text in enumerate(pool["text"]) if text not in used])
    return Task(name=cfg.task, template=cfg.template, verbalizer=words, train=train, dev=dev, test=test)


def placeholder_ids(tokenizer, placeholder: str, length: int) -> list[int]:
    """BBT's p0: the L prompt slots hold the embedding of `placeholder`, one token. A token that is
    natural before the input (a newline before code) starts the search at the hand-written prompt's
    accuracy; arbitrary vocabulary ids (BBT's reference code) start it below, on a small model."""
    ids = tokenizer.encode(placeholder, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"--placeholder {placeholder!r} is {len(ids)} tokens; it must be exactly one")
    return ids * length


def check_label_words(tokenizer, task: Task) -> list[int]:
    """The label words' token ids, or a one-line error offering single-token words: naming
    --verbalizer for a user's task, --model for the built-in task (whose words are its own)."""
    try:
        return label_token_ids(tokenizer, task.verbalizer)
    except UserError as e:
        raise UserError(f"--model: the built-in task's {e}" if task.builtin else f"--verbalizer: {e}")


def encode_texts(texts: list[str], labels, tokenizer, template: str, prompt_length: int, mode: str,
                 max_length: int, placeholder: str = "\n", with_slots: bool = True) -> Split:
    """Inputs as a search scores them: `prompt_length` placeholder slots first in "add" mode (none in
    "cat", where the prompt is inserted, nor for the hand-written template alone: with_slots=False).
    The one encoding of jobs and of `raydapt classify`, so a learned prompt meets the inputs it saw."""
    tokens = prompt_length if mode == "add" and with_slots else 0
    ids, lengths = encode_examples(tokenizer, list(texts), template, tokens, placeholder_id=tokenizer.pad_token_id,
                                   max_length=max_length - (prompt_length if mode == "cat" else 0))
    if tokens:
        ids[:, :tokens] = placeholder_ids(tokenizer, placeholder, tokens)
    return Split(ids, lengths, np.asarray(labels, dtype=np.int64))


def encode_task(task: Task, tokenizer, prompt_length: int, mode: str, max_length: int,
                placeholder: str = "\n") -> EncodedTask:
    def encode(split, with_slots: bool = True) -> Split:
        return encode_texts(split["text"], split["label"], tokenizer, task.template, prompt_length, mode, max_length,
                            placeholder, with_slots)

    label_ids = check_label_words(tokenizer, task)
    return EncodedTask(train=encode(task.train), dev=encode(task.dev), test=encode(task.test),
                       manual_test=encode(task.test, False), label_ids=label_ids, prompt_offset=0,
                       template=task.template, verbalizer=tuple(task.verbalizer), label_names=_names(task))


def _names(task: Task) -> tuple[str, ...] | None:
    names = label_names(task.train)
    return tuple(names) if names else None
