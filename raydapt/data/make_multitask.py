"""Make (and measure) raydapt's multi-task set for input-dependent prompt tuning (Levine et al., 2022).

    python -m raydapt.data.make_multitask             # write raydapt/assets/tasks/multitask/
    python -m raydapt.data.make_multitask --evaluate  # the default large LM with each hand-written template

Four tasks of different kinds, every example cut from the held-out part of the stdlib corpus (files
the default LMs never saw), every target short (1-6 tokens) and judged by exact match:

- `exception` (classification): the default task's examples (`make_default_task.examples`): a `try:`
  block; the answer is the exception its first handler catches (" OSError", " AttributeError",
  " KeyError").
- `function_name` (generation, naming): a function's body (the `def` line removed, dedented); the
  answer is the function's name. unittest's `test*` methods are left out: their names describe a
  test case rather than what the body computes.
- `module` (generation, identification): the body of a function that uses (`mod.attr`) exactly one
  of the modules its file imports with a plain `import mod`; the answer is that module.
- `closing_brackets` (generation, syntax): a one-line statement whose last two or more closing
  brackets are cut off (what is left ends in a letter, digit or `_`); the answer is those brackets.

A row is `{"task", "source", "target"}`; the frozen LM reads `template.format(source=...)` and must
produce the target's tokens and then "\\n" (`raydapt.data.multitask`). A source that occurs twice in
a task is kept once (dropped if its targets disagree), so a task's splits are disjoint. Each task
draws its examples with its own generator seeded by (seed, task index); every encoded example
(template + target + end token) is at most `max_tokens` tokens of the default tokenizer.

The default tokenizer's "\\n" token is a newline before a column-0 line: before indented code the
newline merges with the indentation into another token ("\\n   "). The templates put each answer
where a code LM expects a column-0 line next (`import mod`; a module-level statement after a
`from __future__` line); after the `except` of the classification task the LM wants ":", not "\\n".

Measured by --evaluate (Python 3.11.7, the default large LM, each task's template above): exact
match (the target's tokens and "\\n" are all the greedy argmax), the target's tokens right whatever
follows, and for the classification task the argmax over its three label words at the answer's first
token (chance 0.333), which is how a classification task is best scored when "\\n" is not natural:

    test split (96 rows a task)  exact   target only   label words   exact on train (128) / dev (32)
    exception                    0.000   0.000         0.510         0.000 / 0.000 (label words 0.461 / 0.531)
    function_name                0.000   0.000                       0.000 / 0.000
    module                       0.083   0.083                       0.094 / 0.156
    closing_brackets             0.219   0.219                       0.172 / 0.094

Naming a function is beyond this 4-layer LM with any template tried (comments such as "# the
function above is named" draw English words; `def`-like lines draw a name followed by "(").
"""
from __future__ import annotations

import ast
import bisect
import json
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydapt.config import check, field, parse_args
from raydapt.data import make_default_task
from raydapt.data.corpus import load_corpus, read_text
from raydapt.data.multitask import default_multitask_dir, encode_multitask, exact_match, load_multitask
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError, exit_on_user_error

__all__ = ["TASKS", "MakeMultitaskConfig", "function_examples", "candidates", "make_multitask", "evaluate",
           "main"]

# name, kind, hand-written template, description. The exception task's template is the default task's.
TASKS = [
    ("exception", "classification", "{source}\nexcept",
     "Which exception does a Python try block catch? A try: block; the exception of its first handler."),
    ("function_name", "generation", "{source}\n# the function above is named",
     "Name a function from its body (def line removed, dedented)."),
    ("module", "generation", "{source}\nimport",
     "Which module does a function use? Its body uses attributes of exactly one module its file imports."),
    ("closing_brackets", "generation", "from __future__ import annotations\n\n{source}",
     "Close a one-line Python statement: the two or more closing brackets cut from its end."),
]


@dataclass
class MakeMultitaskConfig:
    """Write the multi-task set's files, or (--evaluate) measure the default large LM on them."""
    output_dir: str = field("", "where tasks.json and the split files go, or what --evaluate reads "
                                "(default: the package's assets)")
    seed: int = field(0, "seed of the example choice")
    train: int = field(128, "train examples per task")
    dev: int = field(32, "dev examples per task")
    test: int = field(96, "test examples per task")
    max_tokens: int = field(96, "longest encoded example (template, target, end token), in default-tokenizer tokens")
    max_target_tokens: int = field(6, "longest target, in default-tokenizer tokens")
    evaluate: bool = field(False, "instead of writing files, print each task's exact match with its template")
    model_dir: str = field("", "model to evaluate (default: the default large LM)")

    def __post_init__(self):
        for name in ("train", "dev", "test", "max_tokens", "max_target_tokens"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")


_CLOSING = re.compile(r"(.*\w)([)\]}]{2,})")


def function_examples(source: str) -> dict[str, list[tuple[str, str]]]:
    """(source, target) pairs of the function_name, module and closing_brackets tasks in one file's text.

    Lines are cut by the AST's line numbers (its column offsets count UTF-8 bytes, not characters).
    A function uses a module when `mod.attr` occurs on the lines of its body, the text its examples show.
    """
    found = {"function_name": [], "module": [], "closing_brackets": []}
    try:
        with warnings.catch_warnings():  # invalid escapes and the like in test files: not our business
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return found
    lines = source.splitlines()
    modules = {a.name for node in tree.body if isinstance(node, ast.Import)
               for a in node.names if a.asname is None and "." not in a.name}
    functions, uses = [], []  # uses: (line, module) of each `module.attr`
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body[0].lineno > node.lineno:
            functions.append(node)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            uses.append((node.lineno, node.value.id))
        elif isinstance(node, (ast.Assign, ast.Expr)) and node.lineno == node.end_lineno:
            line = lines[node.lineno - 1].strip()
            cut = _CLOSING.fullmatch(line)
            if cut and line.isascii():
                found["closing_brackets"].append((cut.group(1), cut.group(2)))
    uses.sort()
    for node in functions:
        first, last = node.body[0].lineno, node.end_lineno
        body = textwrap.dedent("\n".join(lines[first - 1: last])).strip()
        if not node.name.startswith("test"):
            found["function_name"].append((body, " " + node.name))
        used = {m for _, m in uses[bisect.bisect_left(uses, (first, "")): bisect.bisect_right(uses, (last, "\uffff"))]}
        if len(used) == 1:
            found["module"].append((body, " " + used.pop()))
    return found


def _unique(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each source once, in first-seen order; a source seen with two different targets is dropped."""
    targets: dict[str, set[str]] = {}
    for source, target in pairs:
        targets.setdefault(source, set()).add(target)
    return [(s, next(iter(t))) for s, t in targets.items() if len(t) == 1]


def _token_counts(tokenizer, template: str, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of template(source) and of target, per pair, as `encode_multitask` counts them."""
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    encode = tokenizer.backend_tokenizer.encode_batch
    prompts = encode([template.replace("{source}", s) for s, _ in pairs], add_special_tokens=False)
    targets = encode([t for _, t in pairs], add_special_tokens=False)
    return (np.array([len(p.ids) for p in prompts], dtype=np.int64),
            np.array([len(t.ids) for t in targets], dtype=np.int64))


def _check_names(names: list[str] | None) -> list[str]:
    known = [name for name, *_ in TASKS]
    if names is None:
        return known
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"unknown task(s) {unknown}; the tasks are {known}")
    return [n for n in known if n in names]


def candidates(tokenizer, max_tokens: int, max_target_tokens: int, names: list[str] | None = None
               ) -> dict[str, list[tuple[str, str]]]:
    """Every usable held-out (source, target) pair of each task (or of tasks `names`), in corpus order.

    Usable: at most `max_target_tokens` target tokens, at most `max_tokens` in all with the end token.
    """
    names = _check_names(names)
    pairs: dict[str, list[tuple[str, str]]] = {name: [] for name in names}
    if "exception" in names:
        by_class = make_default_task.examples(tokenizer, make_default_task.MakeTaskConfig().max_tokens)
        pairs["exception"] = [(text, word) for word, texts in by_class.items() for text in texts]
    if set(names) - {"exception"}:  # one parse of each held-out file serves the other three tasks
        corpus = load_corpus()
        for f in corpus.held_out:
            for name, found in function_examples(read_text(corpus.root / f) or "").items():
                if name in pairs:
                    pairs[name] += found
    out = {}
    for name, _, template, _ in TASKS:
        if name not in names:
            continue
        unique = [(s, t) for s, t in _unique(pairs[name]) if s and t]
        prompt, target = _token_counts(tokenizer, template, unique)
        keep = (target <= max_target_tokens) & (prompt + target + 1 <= max_tokens)
        out[name] = [p for p, k in zip(unique, keep) if k]
    return out


def _tokenizer(model_dir: str = ""):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(model_dir) if model_dir else default_model_dir("large"))


def make_multitask(cfg: MakeMultitaskConfig, names: list[str] | None = None) -> Path:
    """Draw each task's train/dev/test examples and write the multi-task directory.

    With `names`, only those tasks are made (a quick check of the recipe): each task draws with its
    own generator, so its rows are the same as in the full set.
    """
    tokenizer = _tokenizer()
    pools = candidates(tokenizer, cfg.max_tokens, cfg.max_target_tokens, names)
    want = {"train": cfg.train, "dev": cfg.dev, "test": cfg.test}
    splits: dict[str, list[dict]] = {split: [] for split in want}
    meta = []
    for index, (name, kind, template, description) in enumerate(TASKS):
        if name not in pools:
            continue
        pool = pools[name]
        rng = np.random.default_rng([cfg.seed, index])
        scale = min(1.0, len(pool) / sum(want.values()))
        counts = {split: int(n * scale) for split, n in want.items()}
        if min(counts.values()) < 1:
            raise UserError(f"task {name}: only {len(pool)} held-out examples; too few for three splits")
        order = rng.permutation(len(pool))
        start = 0
        for split, n in counts.items():
            splits[split] += [{"task": name, "source": pool[i][0], "target": pool[i][1]}
                              for i in order[start: start + n]]
            start += n
        entry = {"name": name, "kind": kind, "template": template, "description": description,
                 "counts": {**counts, "available": len(pool)}}
        if kind == "classification":
            entry["labels"] = sorted({t for _, t in pool}, key=make_default_task.CLASSES.index)
        if scale < 1:
            entry["note"] = f"the corpus gives only {len(pool)} examples; each split is scaled down to fit"
        meta.append(entry)
    out = Path(cfg.output_dir) if cfg.output_dir else default_multitask_dir()
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():  # grouped by task, in draw order: a training job shuffles
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"tasks": meta, "end_token": "\n", "max_tokens": cfg.max_tokens,
            "source": "held-out stdlib files (raydapt.data.corpus.is_held_out); the default LMs never saw them",
            "recipe": f"python -m raydapt.data.make_multitask --seed {cfg.seed} --train {cfg.train} "
                      f"--dev {cfg.dev} --test {cfg.test} --max-tokens {cfg.max_tokens} "
                      f"--max-target-tokens {cfg.max_target_tokens}",
            "python": sys.version.split()[0]}
    (out / "tasks.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def evaluate(cfg: MakeMultitaskConfig, split: str = "test", batch_size: int = 64) -> dict:
    """Exact match of the frozen LM with each task's hand-written template (greedy = argmax, teacher-forced).

    Also the share of rows whose target tokens are right whatever comes after them (so the end token's
    share of the misses shows), and for a classification task the accuracy of the argmax over its
    label words at the answer's first token (how `raydapt.data.tasks` scores the default task).
    """
    import torch
    from transformers import AutoModelForCausalLM

    task_dir = Path(cfg.output_dir) if cfg.output_dir else default_multitask_dir()
    multi = load_multitask(task_dir)
    model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir("large")
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    tokenizer = _tokenizer(cfg.model_dir)
    labels = {t["name"]: t.get("labels") for t in json.loads((task_dir / "tasks.json").read_text())["tasks"]}
    result = {"model": str(model_dir), "tasks": str(task_dir), "split": split, "per_task": {}}
    for name, template in zip(multi.names, multi.templates):
        rows = [r for r in getattr(multi, split) if r["task"] == name]
        enc = encode_multitask(tokenizer, multi, rows)
        argmax, first = [], []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                ids = torch.from_numpy(enc.input_ids[i: i + batch_size])
                mask = torch.arange(ids.shape[1])[None] < torch.from_numpy(enc.lengths[i: i + batch_size])[:, None]
                logits = model(input_ids=ids, attention_mask=mask.long()).logits  # (B, T, V)
                argmax.append(logits.argmax(-1).numpy())
                at = torch.from_numpy(enc.target_start[i: i + batch_size]) - 1
                first.append(logits[torch.arange(len(at)), at].numpy())  # (B, V): the answer's first token
        argmax = np.concatenate(argmax)
        report = {"rows": len(rows), "template": template, "exact": float(exact_match(argmax, enc).mean()),
                  "target_only": float(exact_match(argmax, enc, end=False).mean())}
        if labels.get(name):
            word_ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in labels[name]]
            gold = [labels[name].index(r["target"]) for r in rows]
            pick = np.concatenate(first)[:, word_ids].argmax(-1)
            report["label_words"] = float(np.mean(pick == np.array(gold)))
            report["chance"] = 1 / len(word_ids)
        result["per_task"][name] = report
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(MakeMultitaskConfig, argv)
    if cfg.evaluate:
        print(json.dumps(evaluate(cfg), indent=2))
    else:
        print(f"wrote {make_multitask(cfg)}")


if __name__ == "__main__":
    main()
