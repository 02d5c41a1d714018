"""Packing: the best passages, by score, into the frozen reader's context, and the reader's rows.

The reader reads `template` (the task's, e.g. "{passages}\\n\\n# {question}\\nresult =") with the
packed passages in place of {passages}, then must produce the answer's tokens and the end token.
Rows are built from token ids (each passage, separator and question part tokenized on its own), so
a packed row's length is exactly the sum the budget counted.

Rules (the budget is the context minus the soft prompt, the question's frame and the answer):
- candidates are taken greedily in score order; one that does not fit the room left is skipped and
  the next (shorter) ones are still tried, until the candidates run out or `max_passages` are in;
- passages are never cut (the task's recipe already cut each to whole lines under its limit); a
  question longer than `max_question_tokens` keeps its first tokens;
- the packed passages are written best LAST, nearest the question: a causal LM attends most easily
  to recent text (and a closed-book row is the frame alone);
- a context that cannot hold the longest passage of the corpus with the longest question frame and
  answer is refused up front (`check_budget`), so no row is ever packed with nothing by accident.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydapt.data.multitask import IGNORE, EncodedMulti
from raydapt.errors import UserError

__all__ = ["ReaderTokens", "tokenize_reader", "check_budget", "pack", "encode_rows"]

SEPARATOR = "\n\n"


@dataclass
class ReaderTokens:
    """The token ids a packing needs, computed once: every passage, and each question's frame and answer."""
    passages: list[list[int]]
    frames: list[list[int]]      # per question: the template's text after {passages}, question filled in
    answers: list[list[int]]     # per question: answer tokens + end token
    head: list[int]              # the template's text before {passages}
    separator: list[int]
    pad: int


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def tokenize_reader(tokenizer, template: str, end_token: str, passages: list[str] | list[list[int]],
                    questions: list[str], answers: list[str], max_question_tokens: int) -> ReaderTokens:
    """`passages` as texts, or as token ids already (the corpus is tokenized once for every split)."""
    head, tail = template.split("{passages}")
    frames = []
    for q in _ids(tokenizer, questions):  # the question keeps its first max_question_tokens tokens
        question = tokenizer.decode(q[:max_question_tokens])
        frames.append(question)
    before, after = tail.split("{question}")
    pre, post = _ids(tokenizer, [before, after]) if after else (_ids(tokenizer, [before])[0], [])
    frames = [pre + q + post for q in _ids(tokenizer, frames)]
    end = _ids(tokenizer, [end_token])[0]
    passage_ids = passages if passages and not isinstance(passages[0], str) else _ids(tokenizer, passages)
    return ReaderTokens(passages=passage_ids, frames=frames,
                        answers=[a + end for a in _ids(tokenizer, answers)], head=_ids(tokenizer, [head])[0] if head else [],
                        separator=_ids(tokenizer, [SEPARATOR])[0], pad=tokenizer.pad_token_id)


def check_budget(tokens: ReaderTokens, context: int, prompt_length: int) -> int:
    """The longest row's room for passages; a UserError when the longest passage cannot fit it."""
    fixed = prompt_length + len(tokens.head) + max(len(f) for f in tokens.frames) + max(len(a) for a in tokens.answers)
    room = context - fixed
    longest = max(len(p) for p in tokens.passages) + len(tokens.separator)
    if room < longest:
        raise UserError(f"the reader's context of {context} positions cannot hold one passage: after the prompt "
                        f"({prompt_length}), the longest question frame and answer ({fixed - prompt_length}) "
                        f"{room} positions are left and the longest passage needs {longest}; give a longer "
                        "context or a shorter --prompt-length")
    return room


def pack(tokens: ReaderTokens, question: int, candidates: np.ndarray, context: int, prompt_length: int,
         max_passages: int) -> list[int]:
    """Rows of the passages packed for `question`, best first (see the module docstring's rules)."""
    room = context - prompt_length - len(tokens.head) - len(tokens.frames[question]) - len(tokens.answers[question])
    chosen = []
    for row in candidates:
        if len(chosen) == max_passages:
            break
        need = len(tokens.passages[row]) + len(tokens.separator)
        if need <= room:
            chosen.append(int(row))
            room -= need
    return chosen


def encode_rows(tokens: ReaderTokens, packed: list[list[int]]) -> EncodedMulti:
    """Reader rows: head, passages (best last, each followed by the separator), frame, answer + end."""
    seqs, starts = [], []
    for q, rows in enumerate(packed):
        body = list(tokens.head)
        for row in reversed(rows):
            body += tokens.passages[row] + tokens.separator
        body += tokens.frames[q]
        starts.append(len(body))
        seqs.append(body + tokens.answers[q])
    lengths = np.array([len(s) for s in seqs], np.int64)
    width = int(lengths.max())
    input_ids = np.full((len(seqs), width), tokens.pad, np.int64)
    labels = np.full((len(seqs), width), IGNORE, np.int64)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, : len(s)] = s
        labels[i, start: len(s)] = s[start:]
    return EncodedMulti(task=np.zeros(len(seqs), np.int64), input_ids=input_ids, lengths=lengths, labels=labels,
                        target_start=np.array(starts, np.int64))
