"""Make (and measure) raydapt's open-book QA task for frozen readers (Levine et al., 2022).

    python -m raydapt.data.make_openbook             # write raydapt/assets/tasks/openbook/

Question: the summary line of a function's docstring ("Return the current file position.").
Answer: the function's name (" tell"). Corpus: every function of the held-out stdlib files (which
the default LMs never saw), one passage each: its source with the docstring removed (so the
question never occurs verbatim in its passage), dedented, cut at a line boundary to at most
`passage_tokens` default-tokenizer tokens, so that several passages fit the large LM's 256 positions.
The corpus (~15,000 passages) is far too large for the context: without retrieval the LM must guess
the name from the summary alone, which it almost never does; the right passage holds the name in
its `def` line.

Questions come from functions whose summary has at least `min_words` words and whose name is
neither a dunder nor a unittest `test*` method; a summary that occurs twice is dropped (its answer
would be ambiguous). Files written:

- `corpus.jsonl`: `{"id", "text"}` per passage, `id` = "path:line:name";
- `train.jsonl`, `dev.jsonl`, `test.jsonl`: `{"question", "answer", "passage_id"}`;
- `task.json`: counts, the reader's template, the recipe that wrote the files, the Python version.

Measured (Python 3.11.7; `--evaluate`, the default large LM, test split of 256, no prompt tuning):
exact match closed-book 0.000, with the gold passage alone 0.000 (answer tokens alone: 0.000 both).
A prototype that prompt-tuned 8 vectors in-process for 200 Adam steps (batch 16, lr 0.01) on the
gold passage with 0-3 random distractors reached 0.005 with the gold passage alone: this 4-layer LM
does not copy a multi-token name from its context, so the reader, not retrieval, is the bottleneck
of this task. Why: it cannot copy anything. Its copy accuracy (`raydapt.reader.copying`: the second
repeat of 16 random 50-token sequences) is 0.000, as is the small LM's: after 1,000 pre-training
steps (4 M tokens) neither has induction heads, and a tuned prompt did not add one (0.005 above).
An extractive open-book task needs a reader LM that scores well on that test.
BM25 (bench/retrieval.py): recall@1 0.19, @5 0.32, @20 0.45, @100 0.60 on test.
"""
from __future__ import annotations

import ast
import json
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydapt.config import check, field, parse_args
from raydapt.data.corpus import load_corpus, read_text
from raydapt.defaults import assets_dir, default_model_dir
from raydapt.errors import exit_on_user_error

__all__ = ["MakeOpenBookConfig", "functions", "passage_text", "make_openbook", "default_openbook_dir", "evaluate", "main"]

# The reader's text after the packed passages: the question as a comment, then an assignment whose
# right-hand side a code LM fills with a name it has seen above. The answer ends with "(" (a call).
TEMPLATE = "{passages}# {question}\nresult ="
END_TOKEN = "("


@dataclass
class MakeOpenBookConfig:
    """Write the open-book QA task's corpus and question splits."""
    output_dir: str = field("", "where corpus.jsonl, the splits and task.json go (default: the package's assets)")
    seed: int = field(0, "seed of the question choice")
    train: int = field(768, "training questions")
    dev: int = field(128, "dev questions")
    test: int = field(256, "test questions")
    passage_tokens: int = field(48, "longest passage, in default-tokenizer tokens (cut at a line boundary)")
    min_words: int = field(4, "fewest words in a question (a docstring summary)")
    evaluate: bool = field(False, "instead of writing files, print the frozen large LM's exact match on the test "
                                  "split closed-book and with the gold passage alone (no prompt tuning)")

    def __post_init__(self):
        for name in ("train", "dev", "test", "passage_tokens", "min_words"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")


def default_openbook_dir() -> Path:
    return assets_dir() / "tasks" / "openbook"


def functions(path: str, source: str) -> list[tuple[str, str, str | None, str]]:
    """(id, name, docstring summary or None, source without the docstring) of each function in a file."""
    try:
        with warnings.catch_warnings():  # invalid escapes and the like in test files: not our business
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines, found = source.splitlines(), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        keep = list(range(node.lineno - 1, node.end_lineno))
        if doc is not None:  # the docstring's lines go: the question must not be in its own passage
            first = node.body[0]
            keep = [i for i in keep if not first.lineno - 1 <= i < first.end_lineno]
        summary = doc.strip().split("\n")[0].strip() if doc and doc.strip() else None
        text = textwrap.dedent("\n".join(lines[i] for i in keep))
        found.append((f"{path}:{node.lineno}:{node.name}", node.name, summary, text))
    return found


def passage_text(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut after its last whole line that keeps it within `max_tokens` tokens (at least the
    first line, itself cut to `max_tokens` tokens: a passage always names its function)."""
    lines = text.splitlines()
    counts = [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch([ln + "\n" for ln in lines],
                                                                            add_special_tokens=False)]
    total, keep = 0, 0
    for n in counts:
        if total + n > max_tokens:
            break
        total, keep = total + n, keep + 1
    if keep == 0:
        ids = tokenizer.encode(lines[0], add_special_tokens=False)[:max_tokens]
        return tokenizer.decode(ids)
    return "\n".join(lines[:keep])


def _questions(found: list[tuple[str, str, str | None, str]], min_words: int) -> list[tuple[str, str, str]]:
    """(question, answer, passage id) of usable functions, each question once (duplicates dropped)."""
    by_question: dict[str, list[tuple[str, str]]] = {}
    for pid, name, summary, _ in found:
        if summary is None or name.startswith(("__", "test")) or len(summary.split()) < min_words:
            continue
        by_question.setdefault(summary, []).append((" " + name, pid))
    return [(q, hits[0][0], hits[0][1]) for q, hits in by_question.items() if len(hits) == 1]


def make_openbook(cfg: MakeOpenBookConfig) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("large"))
    corpus = load_corpus()
    found = []
    for f in corpus.held_out:
        found += functions(f, read_text(corpus.root / f) or "")
    passages = [{"id": pid, "text": passage_text(tokenizer, text, cfg.passage_tokens)} for pid, _, _, text in found]
    questions = _questions(found, cfg.min_words)
    order = np.random.default_rng(cfg.seed).permutation(len(questions))
    want = {"train": cfg.train, "dev": cfg.dev, "test": cfg.test}
    check(sum(want.values()) <= len(questions), "train", f"train + dev + test = {sum(want.values())} exceeds the "
          f"{len(questions)} usable questions")
    out = Path(cfg.output_dir) if cfg.output_dir else default_openbook_dir()
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in want.items():
        rows = [{"question": questions[i][0], "answer": questions[i][1], "passage_id": questions[i][2]}
                for i in order[start: start + n]]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        start += n
    (out / "corpus.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
    info = {"template": TEMPLATE, "end_token": END_TOKEN, "passages": len(passages),
            "questions_available": len(questions), "counts": want, "passage_tokens": cfg.passage_tokens,
            "source": "held-out stdlib files (raydapt.data.corpus.is_held_out); the default LMs never saw them",
            "recipe": f"python -m raydapt.data.make_openbook --seed {cfg.seed} --train {cfg.train} --dev {cfg.dev} "
                      f"--test {cfg.test} --passage-tokens {cfg.passage_tokens} --min-words {cfg.min_words}",
            "python": sys.version.split()[0]}
    (out / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def evaluate(cfg: MakeOpenBookConfig, split: str = "test", batch_size: int = 32) -> dict:
    """Exact match (answer tokens and end token all the greedy argmax, teacher-forced) of the frozen
    large LM reading the task's template with no passage (closed book) and with the gold passage alone,
    and its copy accuracy (the induction test: can it read a token out of its context at all?)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydapt.data.multitask import exact_match
    from raydapt.reader.copying import copy_accuracy
    from raydapt.reader.data import load_questions, load_task_info
    from raydapt.reader.packing import encode_rows, tokenize_reader
    from raydapt.reader.retrieval import load_corpus_file

    task_dir = Path(cfg.output_dir) if cfg.output_dir else default_openbook_dir()
    info, corpus = load_task_info(task_dir), load_corpus_file(task_dir / "corpus.jsonl")
    questions = load_questions(task_dir / f"{split}.jsonl")
    model_dir = default_model_dir("large")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    tokens = tokenize_reader(tokenizer, info["template"], info["end_token"], corpus.texts, questions.questions,
                             questions.answers, max_question_tokens=48)
    row = corpus.row()
    result = {"split": split, "questions": len(questions.questions), "template": info["template"],
              "copy_accuracy": copy_accuracy(model, len(tokenizer))}
    for name, packed in (("closed_book", [[] for _ in questions.questions]),
                         ("gold_passage", [[row[p]] for p in questions.passage_ids])):
        enc = encode_rows(tokens, packed)
        argmax = []
        with torch.no_grad():
            for i in range(0, len(enc.lengths), batch_size):
                ids = torch.from_numpy(enc.input_ids[i: i + batch_size])
                mask = torch.arange(ids.shape[1])[None] < torch.from_numpy(enc.lengths[i: i + batch_size])[:, None]
                argmax.append(model(input_ids=ids, attention_mask=mask.long()).logits.argmax(-1).numpy())
        argmax = np.concatenate(argmax)
        result[name] = {"exact": float(exact_match(argmax, enc).mean()),
                        "answer_only": float(exact_match(argmax, enc, end=False).mean())}
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(MakeOpenBookConfig, argv)
    if cfg.evaluate:
        print(json.dumps(evaluate(cfg), indent=2))
    else:
        print(f"wrote {make_openbook(cfg)}")


if __name__ == "__main__":
    main()
