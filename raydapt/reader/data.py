"""The open-book task's files: questions (jsonl) and the task description (task.json).

A question row is `{"question": str, "answer": str}` with, when known, `"passage_id"` (the passage
that holds the answer: recall@k and the re-ranker's positives need it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raydapt.errors import UserError

__all__ = ["Questions", "load_questions", "load_task_info"]


@dataclass
class Questions:
    questions: list[str]
    answers: list[str]
    passage_ids: list[str | None]


def load_questions(path: str | Path) -> Questions:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"question file {path} does not exist")
    out = Questions([], [], [])
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})")
        missing = [k for k in ("question", "answer") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise UserError(f"{path}:{n}: no {' or '.join(missing)} column; a question row is "
                            '{"question": str, "answer": str[, "passage_id": str]}')
        if not row["answer"]:
            raise UserError(f"{path}:{n}: an empty answer")
        out.questions.append(row["question"])
        out.answers.append(row["answer"])
        out.passage_ids.append(row.get("passage_id"))
    if not out.questions:
        raise UserError(f"question file {path} has no rows")
    return out


def load_task_info(directory: str | Path) -> dict:
    path = Path(directory) / "task.json"
    if not path.is_file():
        raise UserError(f"{directory} is not an open-book task directory (no task.json)")
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("template", "").count("{passages}") != 1 or info["template"].count("{question}") != 1:
        raise UserError(f"{path}: the template must hold {{passages}} and {{question}} once each")
    return info
