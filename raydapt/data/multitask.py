"""Multi-task generation data: several tasks of different kinds mixed in one set of splits.

The shipped multi-task set (`raydapt/assets/tasks/multitask/`, made by `raydapt.data.make_multitask`)
is for input-dependent prompt tuning (Levine et al., 2022), whose point is that a prompt computed
from the input beats one static prompt when tasks are mixed. A directory holds

- `tasks.json`: `{"tasks": [{"name", "kind", "template", "description", "counts"}, ...], ...}`; each
  template holds `{source}` once: the hand-written prompt of that task;
- `train.jsonl`, `dev.jsonl`, `test.jsonl`: rows `{"task": name, "source": ..., "target": ...}`.

Every task is scored as generation: the frozen LM reads `template.format(source=...)` and must
produce the target's tokens and then the end token ("\\n"), so a greedy answer stops there. A
classification task (its targets are a few single-token words) is scored the same way.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydapt.defaults import assets_dir
from raydapt.errors import UserError

__all__ = ["IGNORE", "KINDS", "SPLITS", "MultiTask", "EncodedMulti", "default_multitask_dir", "load_multitask",
           "select_tasks", "encode_multitask", "end_token_id", "exact_match"]

IGNORE = -100  # the label of a position no loss is taken at (Hugging Face's ignore_index)
KINDS = ("classification", "generation")
SPLITS = ("train", "dev", "test")


@dataclass
class MultiTask:
    """Tasks (parallel lists, index = task id) and their split rows `{"task", "source", "target"}`."""
    names: list[str]
    kinds: list[str]
    templates: list[str]
    train: list[dict]
    dev: list[dict]
    test: list[dict]
    descriptions: list[str] | None = None

    def index(self, name: str) -> int:
        """The id of task `name`; a UserError names the known tasks otherwise."""
        if name not in self.names:
            raise UserError(f"unknown task {name!r}; the tasks are {self.names}")
        return self.names.index(name)


@dataclass
class EncodedMulti:
    """Rows ready for a causal LM: prompt, target, END; labels only at target and END positions.

    Shapes: task (N,), input_ids (N, T), lengths (N,), labels (N, T), target_start (N,); all int64.
    The token at position p is predicted from the logits at p - 1, so the answer's logits are at
    target_start - 1 .. lengths - 2 (Hugging Face's causal LM loss shifts `labels` the same way).
    """
    task: np.ndarray
    input_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    target_start: np.ndarray


def default_multitask_dir() -> Path:
    return assets_dir() / "tasks" / "multitask"


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path.parent} is not a multi-task directory: {path.name} is missing")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})")
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("task", "source", "target"))):
            raise UserError(f"{path}:{n}: a row must be an object with string fields task, source, target")
        rows.append({"task": row["task"], "source": row["source"], "target": row["target"]})
    return rows


def load_multitask(directory: str | Path | None = None) -> MultiTask:
    """Read a multi-task directory (default: the shipped one); see the module docstring for its files."""
    directory = Path(directory) if directory is not None else default_multitask_dir()
    meta_path = directory / "tasks.json"
    if not meta_path.is_file():
        what = "does not exist" if not directory.exists() else "is not a multi-task directory (no tasks.json)"
        raise UserError(f"{directory} {what}")
    try:
        tasks = json.loads(meta_path.read_text(encoding="utf-8"))["tasks"]
        names = [str(t["name"]) for t in tasks]
        kinds = [str(t["kind"]) for t in tasks]
        templates = [str(t["template"]) for t in tasks]
        descriptions = [str(t.get("description", "")) for t in tasks]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: expected {{\"tasks\": [{{\"name\", \"kind\", \"template\", ...}}]}} "
                        f"({type(e).__name__}: {e})")
    if not names or len(set(names)) != len(names):
        raise UserError(f"{meta_path}: task names must be present and distinct, got {names}")
    for name, kind, template in zip(names, kinds, templates):
        if kind not in KINDS:
            raise UserError(f"{meta_path}: task {name!r} has kind {kind!r}; accepted: {list(KINDS)}")
        if template.count("{source}") != 1:
            raise UserError(f"{meta_path}: task {name!r}: the template must contain '{{source}}' exactly once, "
                            f"got {template!r}")
    splits = {split: _read_rows(directory / f"{split}.jsonl") for split in SPLITS}
    for split, rows in splits.items():
        unknown = sorted({r["task"] for r in rows} - set(names))
        if unknown:
            raise UserError(f"{directory / f'{split}.jsonl'}: unknown task(s) {unknown}; tasks.json names {names}")
    return MultiTask(names=names, kinds=kinds, templates=templates, descriptions=descriptions, **splits)


def end_token_id(tokenizer, end_token: str = "\n") -> int:
    """The id of `end_token`, which must be exactly one token of `tokenizer`."""
    ids = tokenizer.encode(end_token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"end token {end_token!r} is {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)} "
                        "in this tokenizer; it must be exactly one token")
    return ids[0]


def encode_multitask(tokenizer, multi: MultiTask, rows: list[dict], end_token: str = "\n") -> EncodedMulti:
    """Encode rows as template(source) tokens + target tokens + END, right-padded with the pad id.

    The prompt and the target are tokenized apart, as a generating model sees them: the prompt is
    given, and the target's tokens are what greedy decoding must produce after it, then END.
    No BOS/EOS is added (the default LMs are trained without them).
    """
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token")
    end = end_token_id(tokenizer, end_token)
    encode = tokenizer.backend_tokenizer.encode_batch if hasattr(tokenizer, "backend_tokenizer") else None
    task_ids = np.array([multi.index(r["task"]) for r in rows], dtype=np.int64)
    prompts = [multi.templates[t].replace("{source}", r["source"]) for t, r in zip(task_ids, rows)]
    targets = [r["target"] for r in rows]
    if encode is not None:  # one batched call: ~50x faster than a Python loop over rows
        prompt_ids = [e.ids for e in encode(prompts, add_special_tokens=False)] if rows else []
        target_ids = [e.ids for e in encode(targets, add_special_tokens=False)] if rows else []
    else:
        prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        target_ids = [tokenizer.encode(t, add_special_tokens=False) for t in targets]
    for row, ids in zip(rows, target_ids):
        if not ids:
            raise UserError(f"task {row['task']!r}: an empty target (source {row['source'][:60]!r})")
    seqs = [p + t + [end] for p, t in zip(prompt_ids, target_ids)]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    T = int(lengths.max(initial=0))
    input_ids = np.full((len(rows), T), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), T), IGNORE, dtype=np.int64)
    target_start = np.array([len(p) for p in prompt_ids], dtype=np.int64)
    for i, seq in enumerate(seqs):
        input_ids[i, : len(seq)] = seq
        labels[i, target_start[i]: len(seq)] = seq[target_start[i]:]
    return EncodedMulti(task=task_ids, input_ids=input_ids, lengths=lengths, labels=labels,
                        target_start=target_start)


def exact_match(predictions: np.ndarray, encoded: EncodedMulti, end: bool = True) -> np.ndarray:
    """(N,) bool: every labelled token is the argmax predicted for it (teacher-forced greedy decoding).

    `predictions` (N, T) holds the argmax of the logits at each position, so the token at position p
    is checked against predictions[:, p - 1]. With end=False the END token is not checked (the target's
    tokens are right, whatever comes after them).
    """
    N, T = encoded.labels.shape
    if predictions.shape[0] != N or predictions.shape[1] < T - 1:
        raise ValueError(f"predictions {predictions.shape} do not cover labels {encoded.labels.shape}")
    checked = encoded.labels[:, 1:] != IGNORE  # (N, T-1): position p + 1 is labelled
    if not end:
        checked &= np.arange(1, T)[None] < (encoded.lengths - 1)[:, None]
    right = predictions[:, : T - 1] == encoded.labels[:, 1:]
    return np.all(right | ~checked, axis=1)


def select_tasks(multi: MultiTask, names: list[str]) -> MultiTask:
    """`multi` restricted to `names`, in that order (all tasks when empty); an unknown name is a UserError."""
    if not names:
        return multi
    unknown = [n for n in names if n not in multi.names]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r}; accepted: {', '.join(multi.names)}")
    keep = [multi.names.index(n) for n in names]
    pick = lambda rows: [r for r in rows if r["task"] in names]  # noqa: E731
    return dataclasses.replace(multi, names=list(names), kinds=[multi.kinds[i] for i in keep],
                               templates=[multi.templates[i] for i in keep],
                               descriptions=multi.descriptions and [multi.descriptions[i] for i in keep],
                               train=pick(multi.train), dev=pick(multi.dev), test=pick(multi.test))
