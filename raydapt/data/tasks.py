"""Few-shot classification tasks: Hugging Face `datasets.Dataset`s with a `text` and a `label` column.

A task is scored the way BBT scores it (Sun et al., 2022): the input is a template filled with the
text, the model's next-token logits at the end of it are read at the verbalizer's label words, one
single-token word per class. BBT's continuous prompt occupies `prompt_tokens` placeholder slots at the
start of each row ("add" mode adds the prompt to their embeddings).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pa_parquet
from datasets import ClassLabel, Dataset, Features, Value

from raydapt.defaults import assets_dir
from raydapt.errors import UserError

__all__ = ["Task", "SUPPORTED_EXTENSIONS", "load_task_file", "label_names", "check_label_ids", "few_shot",
           "load_task", "default_task", "default_task_dir", "encode_examples", "label_token_ids",
           "single_token_alternatives", "COMMON_LABEL_WORDS"]

SUPPORTED_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")


@dataclass
class Task:
    """A few-shot task: the answer is the token after `template.format(text=...)`."""
    name: str
    template: str
    verbalizer: list[str]
    train: Dataset
    dev: Dataset
    test: Dataset
    description: str = ""
    builtin: bool = False  # raydapt's own task, with its own template and label words (no --task)


def _read_table(path: Path) -> pa.Table:
    ext = path.suffix.lower()
    try:
        if ext == ".csv":
            return pa_csv.read_csv(path)
        if ext == ".jsonl":
            return pa_json.read_json(path)
        if ext == ".parquet":
            return pa_parquet.read_table(path)
        rows = json.loads(path.read_text(encoding="utf-8"))  # .json: a list of records or a dict of columns
        return pa.Table.from_pylist(rows) if isinstance(rows, list) else pa.Table.from_pydict(rows)
    except (pa.ArrowInvalid, ValueError, TypeError, OSError) as e:
        raise UserError(f"cannot read {path} as {ext[1:]}: {str(e).splitlines()[0]}")


def label_names(dataset: Dataset) -> list[str] | None:
    """The names behind a task file's label ids (string labels), or None (integer labels)."""
    feature = dataset.features["label"]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _int_labels(values: list, path: Path, column: str, like: Dataset | None) -> tuple[list[int], list[str] | None]:
    """Integer labels as given (must be >= 0), or strings numbered in sorted order (names returned).

    With `like`, the ids are `like`'s: its names number the strings, and a label it lacks is refused.
    """
    if any(v is None for v in values):
        raise UserError(f"{path}: column {column!r} has empty values")
    strings = all(isinstance(v, str) for v in values)
    integers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v >= 0
                   for v in values)
    if not (strings or integers):
        raise UserError(f"{path}: column {column!r} must hold non-negative integers or strings")
    if like is None:
        if integers:
            return [int(v) for v in values], None
        names = sorted(set(values))
    else:
        names = label_names(like)
        if names is None and not integers:
            raise UserError(f"{path}: column {column!r} holds strings, but the task file's labels are integers")
        if names is None:
            return [int(v) for v in values], None
        if not strings:
            raise UserError(f"{path}: column {column!r} holds integers, but the task file's labels are "
                            f"the names {names}")
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UserError(f"{path}: label(s) {unknown} are not among the task file's labels; accepted: {names}")
    index = {name: i for i, name in enumerate(names)}
    return [index[v] for v in values], names


def load_task_file(path, text_column: str = "text", label_column: str = "label",
                   like: Dataset | None = None) -> Dataset:
    """Read a .csv/.jsonl/.json/.parquet file into a Dataset with columns `text` (str), `label` (int).

    Integer labels are kept as they are. String labels are numbered in sorted order ("neg" -> 0,
    "pos" -> 1) and the names kept as a `ClassLabel` feature, so `features["label"].names` maps back.
    Other columns are dropped. A second file of the same task (a test file) passes the first as
    `like`: its labels are then numbered by the first file's mapping, never by its own (a test file
    holding only "pos" must give it id 1, not 0), and labels outside that mapping are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise UserError(f"task file {path}: unsupported extension {path.suffix!r}; "
                        f"accepted: {', '.join(SUPPORTED_EXTENSIONS)}")
    table = _read_table(path)
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in table.column_names:
            raise UserError(f"{path}: no {role} column {column!r} (--{role}-column names it); its columns are "
                            f"{table.column_names}")
    texts = table.column(text_column).to_pylist()
    if any(t is None for t in texts):
        raise UserError(f"{path}: column {text_column!r} has empty values")
    labels, names = _int_labels(table.column(label_column).to_pylist(), path, label_column, like)
    # Features given up front, not cast afterwards: a cast prints a progress bar on stderr.
    features = Features({"text": Value("string"), "label": ClassLabel(names=names) if names else Value("int64")})
    return Dataset.from_dict({"text": [str(t) for t in texts], "label": labels}, features=features)


def few_shot(dataset: Dataset, k: int, seed: int) -> tuple[Dataset, Dataset]:
    """`k` examples per class for train and another, disjoint `k` per class for dev, drawn with `seed`.

    Both come back shuffled (classes interleaved); the same seed gives the same examples.
    """
    if k < 1:
        raise UserError(f"k must be a positive number of examples per class, got {k}")
    labels = np.asarray(dataset["label"])
    rng = np.random.default_rng(seed)
    train, dev = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2 * k:
            raise UserError(f"class {int(c)} has {len(idx)} examples; k={k} needs 2k={2 * k} per class "
                            "(k for train, k for dev)")
        train.extend(idx[:k])
        dev.extend(idx[k: 2 * k])
    return (dataset.select(rng.permutation(train).tolist()), dataset.select(rng.permutation(dev).tolist()))


def default_task_dir() -> Path:
    return assets_dir() / "tasks" / "default"


def load_task(directory, seed: int, k: int = 16) -> Task:
    """A task stored as `task.json` (name, template, verbalizer, description) + `train.jsonl` (the pool
    few-shot train/dev are drawn from) + `test.jsonl` (fixed)."""
    directory = Path(directory)
    meta_path = directory / "task.json"
    if not meta_path.is_file():
        raise UserError(f"{directory} is not a task directory (no task.json)")
    meta = json.loads(meta_path.read_text())
    pool = load_task_file(directory / "train.jsonl")
    verbalizer = list(meta["verbalizer"])
    test = load_task_file(directory / "test.jsonl", like=pool)
    for split, data in (("train.jsonl", pool), ("test.jsonl", test)):
        check_label_ids(data["label"], len(verbalizer), f"{directory / split}", exact=split == "train.jsonl")
    train, dev = few_shot(pool, k, seed)
    return Task(name=meta["name"], template=meta["template"], verbalizer=verbalizer,
                train=train, dev=dev, test=test, description=meta.get("description", ""))


def check_label_ids(labels: list[int], n_classes: int, where: str, exact: bool) -> None:
    """Every id names one of the `n_classes` label words; with `exact`, every word's class occurs too.

    The task file must hold every class (a word without examples is a class the few-shot sample
    cannot draw); a test file may lack some, but an id without a word cannot be scored.
    """
    present = sorted(set(int(v) for v in labels))
    outside = [v for v in present if v >= n_classes]
    if outside:
        raise UserError(f"{where}: label id(s) {outside} have no label word; {n_classes} words cover ids "
                        f"0..{n_classes - 1}")
    if exact and len(present) != n_classes:
        missing = sorted(set(range(n_classes)) - set(present))
        raise UserError(f"{where}: {n_classes} label words but no examples of class id(s) {missing}; "
                        f"the labels present are {present}")


def default_task(seed: int, k: int = 16) -> Task:
    """The default task (see `raydapt.data.make_default_task`): k-shot train/dev, the fixed test split."""
    return dataclasses.replace(load_task(default_task_dir(), seed, k), builtin=True)


# Label words prompts commonly use; the ones a tokenizer holds as one token are offered in place of
# a rejected word (the default tokenizer, trained on Python source, has ' bad', ' no', ' ok', ' true').
COMMON_LABEL_WORDS = ("good", "great", "bad", "terrible", "positive", "negative", "neutral", "yes", "no", "maybe",
                      "true", "false", "right", "wrong", "correct", "ok", "fine", "nice", "poor", "awful",
                      "love", "hate", "happy", "sad", "high", "low", "pass", "fail", "valid", "invalid", "not")


def _one_token(tokenizer, word: str) -> bool:
    return len(tokenizer.encode(word, add_special_tokens=False)) == 1


def single_token_alternatives(tokenizer, word: str, n: int = 6) -> tuple[list[str], list[str]]:
    """Words `tokenizer` holds as one token, to offer in place of the multi-token `word`.

    Returns (common label words, words spelled like `word`): both in `word`'s form (a leading
    space kept or not, capitalised or not); the second from the vocabulary by difflib, whole
    alphabetic words only, so a user sees what the tokenizer has near the word they wanted.
    """
    space = " " if word.startswith(" ") else ""
    core = word.strip()
    case = str.capitalize if core[:1].isupper() else str.lower
    common = [space + case(w) for w in COMMON_LABEL_WORDS]
    common = [w for w in dict.fromkeys(common) if w != word and _one_token(tokenizer, w)][:n]
    pieces = {tokenizer.decode([i]) for i in range(len(tokenizer))}
    vocab = [t for t in pieces if t.startswith(space) and t[len(space):].isalpha() and len(t.strip()) >= 2
             and (space or not t.startswith(" ")) and t not in common]
    near = difflib.get_close_matches(word, vocab, n=3 * n, cutoff=0.7)
    return common, [w for w in near if _one_token(tokenizer, w)][: n // 2]


def label_token_ids(tokenizer, verbalizer: list[str]) -> list[int]:
    """The token id of each label word; each must be exactly one token of `tokenizer`.

    A word that is not gets a one-line error listing single-token words the tokenizer does hold.
    """
    ids = []
    for word in verbalizer:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            common, near = single_token_alternatives(tokenizer, word)
            offer = ", ".join(repr(w) for w in common + near) or "none found"
            raise UserError(f"label word {word!r} is {len(tokens)} tokens {pieces} in this tokenizer; each label "
                            f"word must be exactly one token. Single-token words it has: {offer}; or use a "
                            "model whose tokenizer has the word")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"label words {verbalizer} map to repeated tokens {ids}")
    return ids


def _truncate_left(tokenizer, prefix: str, text: str, suffix: str, budget: int) -> list[int]:
    """Tokens of prefix + text + suffix, dropping tokens from the left of `text` until they fit."""
    ids = tokenizer.encode(prefix + text + suffix, add_special_tokens=False)
    while len(ids) > budget:
        if not text:
            raise UserError(f"the template alone is {len(ids)} tokens, more than the {budget} allowed")
        # Cut at a token boundary of the text's own tokenization; re-encode the whole string, since
        # merges across the template/text boundary can change the count by one.
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut = min(len(ids) - budget, len(offsets))
        text = text[offsets[cut][0]:] if cut < len(offsets) else ""
        ids = tokenizer.encode(prefix + text + suffix, add_special_tokens=False)
    return ids


def encode_examples(tokenizer, texts: list[str], template: str, prompt_tokens: int = 0,
                    placeholder_id: int | None = None, max_length: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of [placeholder_id] * prompt_tokens + tokens(template.format(text=t)), no BOS/EOS.

    Returns input_ids (N, T) int64, right-padded with the tokenizer's pad id (T = the longest row),
    and lengths (N,) int64; the answer is predicted at position lengths - 1. With `max_length`, texts
    are cut from their left so that the end of the template always survives.
    """
    if template.count("{text}") != 1:
        raise UserError(f"template must contain '{{text}}' exactly once, got {template!r}")
    if prompt_tokens < 0 or (prompt_tokens > 0 and placeholder_id is None):
        raise UserError("prompt_tokens must be >= 0, and a placeholder_id is needed when it is > 0")
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token")
    prefix, suffix = template.split("{text}")
    budget = None if max_length is None else max_length - prompt_tokens
    if budget is not None and budget < 1:
        raise UserError(f"max_length={max_length} leaves no room after {prompt_tokens} prompt tokens")
    rows = []
    for text in texts:
        ids = (tokenizer.encode(prefix + text + suffix, add_special_tokens=False) if budget is None
               else _truncate_left(tokenizer, prefix, text, suffix, budget))
        rows.append([placeholder_id] * prompt_tokens + ids)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    input_ids = np.full((len(rows), int(lengths.max(initial=0))), tokenizer.pad_token_id, dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
    return input_ids, lengths
