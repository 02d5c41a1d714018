"""Make (and measure) raydapt's default few-shot task: which exception does this try block catch?

    python -m raydapt.data.make_default_task             # write raydapt/assets/tasks/default/
    python -m raydapt.data.make_default_task --evaluate  # manual-template vs gradient-tuned accuracy

Each example is a `try:` block (the `try:` line and its body, dedented, at most `max_tokens` tokens of
the default tokenizer) from the held-out part of the stdlib corpus, which the default LMs never saw;
its label is the exception named by the block's first handler (`except OSError:` or
`except OSError as e:`). The template appends the next line's `except`, so the answer is the token a
Python LM predicts there. The knowledge needed (file and socket calls raise OSError, `getattr` and
optional attributes AttributeError, `d[key]` KeyError) is what a code LM picks up.
Train pool and test are disjoint examples (identical blocks are kept once).
"""
from __future__ import annotations

import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydapt.config import check, field, parse_args
from raydapt.data.corpus import load_corpus, read_text
from raydapt.data.tasks import default_task_dir
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError, exit_on_user_error

__all__ = ["CLASSES", "TEMPLATE", "MakeTaskConfig", "try_blocks", "examples", "make_task", "evaluate",
           "main"]

# One token each in the default tokenizer. Three classes: the template's prior is far from uniform
# (" ImportError" dwarfs everything; " ValueError" and " TypeError" sit low), so with a fourth class
# the hand-written template came out barely above chance; of the third classes tried (ValueError,
# TypeError, Exception, KeyError), KeyError left the widest gap between template and tuned prompt.
CLASSES = [" OSError", " AttributeError", " KeyError"]
TEMPLATE = "{text}\nexcept"
DESCRIPTION = ("Which exception does a Python try block catch? The text is a try: block from stdlib "
               "files held out of pretraining; the answer is the exception of its first handler.")


@dataclass
class MakeTaskConfig:
    """Write the default task's files, or (--evaluate) measure the default large LM on it."""
    output_dir: str = field("", "where task.json, train.jsonl, test.jsonl go (default: the package's assets)")
    seed: int = field(0, "seed for example choice, few-shot sampling and prompt tuning")
    train_per_class: int = field(36, "examples per class in the train pool (few-shot train and dev come from it)")
    test_per_class: int = field(50, "examples per class in the fixed test split")
    max_tokens: int = field(48, "longest example text, in tokens of the default tokenizer")
    evaluate: bool = field(False, "instead of writing files, print the two reference accuracies")
    model_dir: str = field("", "model to evaluate (default: the default large LM)")
    k: int = field(16, "few-shot examples per class for --evaluate")
    repeats: int = field(3, "--evaluate: few-shot draws (seeds seed, seed+1, ...) to tune a prompt on")
    prompt_length: int = field(50, "placeholder slots for the gradient-tuned prompt")
    steps: int = field(100, "Adam steps of gradient prompt tuning")
    lr: float = field(0.003, "Adam learning rate of gradient prompt tuning")
    template: str = field("", "for --evaluate: a template to try instead of the task's")

    def __post_init__(self):
        for name in ("train_per_class", "test_per_class", "max_tokens", "k", "repeats", "prompt_length",
                     "steps"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")


def try_blocks(source: str) -> list[tuple[str, str]]:
    """(dedented `try:` block, exception of its first handler) for each `try:` with a named handler."""
    lines, found = source.splitlines(), []
    for i, line in enumerate(lines):
        head = re.match(r"(\s*)try:\s*$", line)
        if not head:
            continue
        indent, j = head.group(1), i + 1
        while j < len(lines) and (not lines[j].strip() or
                                  len(lines[j]) - len(lines[j].lstrip()) > len(indent)):
            j += 1
        handler = re.match(rf"{indent}except ([A-Za-z_][A-Za-z0-9_]*)\s*(:| as )", lines[j]) \
            if j < len(lines) else None
        if handler:
            found.append((textwrap.dedent("\n".join(lines[i:j])).strip(), handler.group(1)))
    return found


def examples(tokenizer, max_tokens: int) -> dict[str, list[str]]:
    """Held-out try blocks of each class (label word -> texts), in corpus order.

    A block that occurs more than once is kept once, and dropped if its handlers disagree.
    """
    corpus = load_corpus()
    labels: dict[str, set[str]] = {}  # insertion-ordered: corpus order
    for f in corpus.held_out:
        for text, exc in try_blocks(read_text(corpus.root / f) or ""):
            labels.setdefault(text, set()).add(" " + exc)
    by_class: dict[str, list[str]] = {word: [] for word in CLASSES}
    for text, words in labels.items():
        word = next(iter(words))
        if len(words) == 1 and word in by_class and \
                len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids) <= max_tokens:
            by_class[word].append(text)
    return by_class


def make_task(cfg: MakeTaskConfig) -> Path:
    """Sample train pool and test examples per class and write the task directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("large"))
    rng = np.random.default_rng(cfg.seed)
    need = cfg.train_per_class + cfg.test_per_class
    train, test = [], []
    for label, (word, texts) in enumerate(examples(tokenizer, cfg.max_tokens).items()):
        if len(texts) < need:
            raise UserError(f"only {len(texts)} held-out examples of{word}; {need} are needed per class")
        chosen = [texts[i] for i in rng.choice(len(texts), need, replace=False)]
        train += [{"text": t, "label": label} for t in chosen[: cfg.train_per_class]]
        test += [{"text": t, "label": label} for t in chosen[cfg.train_per_class:]]
    out = Path(cfg.output_dir) if cfg.output_dir else default_task_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        rows = [rows[i] for i in rng.permutation(len(rows))]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"name": "stdlib-except", "template": TEMPLATE, "verbalizer": CLASSES,
            "placeholder": "<|endoftext|>", "description": DESCRIPTION,
            "recipe": "python -m raydapt.data.make_default_task "
                      f"--seed {cfg.seed} --train-per-class {cfg.train_per_class} "
                      f"--test-per-class {cfg.test_per_class} --max-tokens {cfg.max_tokens}",
            "python": sys.version.split()[0]}
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def evaluate(cfg: MakeTaskConfig) -> dict:
    """Test accuracy of the frozen LM with the hand-written template, and with a gradient-tuned prompt.

    The tuned prompt (`raydapt.gradient_prompt.tune_prompt`) learns on the k-shot train set only;
    it is BBT's white-box upper reference.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydapt.data.tasks import encode_examples, label_token_ids, load_task
    from raydapt.bbt.losses import accuracy
    from raydapt.gradient_prompt import prompted_label_logits, tune_prompt

    model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir("large")
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task_dir = Path(cfg.output_dir) if cfg.output_dir else default_task_dir()
    task = load_task(task_dir, cfg.seed, cfg.k)  # the test split and template; train/dev per run below
    template = cfg.template or task.template
    meta = json.loads((task_dir / "task.json").read_text())
    placeholder = tokenizer.convert_tokens_to_ids(meta.get("placeholder", tokenizer.eos_token))
    label_ids = label_token_ids(tokenizer, task.verbalizer)
    L = cfg.prompt_length

    def acc(split, prompt_tokens, prompt=None):
        ids, lengths = encode_examples(tokenizer, split["text"], template, prompt_tokens, placeholder)
        return accuracy(prompted_label_logits(model, ids, lengths, prompt, label_ids).numpy(), np.asarray(split["label"]))

    result = {"model": str(model_dir), "task": str(task_dir), "template": template, "k": cfg.k,
              "chance": 1 / len(label_ids), "manual_test": acc(task.test, 0),
              "placeholders_zero_prompt_test": acc(task.test, L),
              "prompt_length": L, "steps": cfg.steps, "lr": cfg.lr, "runs": []}
    for seed in range(cfg.seed, cfg.seed + cfg.repeats):
        task = load_task(task_dir, seed, cfg.k)
        ids, lengths = encode_examples(tokenizer, task.train["text"], template, L, placeholder)
        prompt = tune_prompt(model, ids, lengths, task.train["label"], label_ids, L, cfg.steps, cfg.lr, seed)
        result["runs"].append({"seed": seed, "manual_dev": acc(task.dev, 0),
                               "tuned_train": acc(task.train, L, prompt), "tuned_dev": acc(task.dev, L, prompt),
                               "tuned_test": acc(task.test, L, prompt)})
    result["tuned_test_mean"] = float(np.mean([r["tuned_test"] for r in result["runs"]]))
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(MakeTaskConfig, argv)
    if cfg.evaluate:
        print(json.dumps(evaluate(cfg), indent=2))
    else:
        print(f"wrote {make_task(cfg)}")


if __name__ == "__main__":
    main()
