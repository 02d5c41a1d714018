"""CombLM's two domains, cut into fixed-length token blocks and split, stored as `datasets` parquet.

Default target domain: the topic pages of the Python documentation that ship with every Python
(`pydoc_data.topics`: English prose about the language, with grammar and examples). The default models
never saw them: pretraining reads only .py files and skips `pydoc_data`. Default general domain: the
held-out stdlib source files (the large LM's own kind of text, unseen files).

Split: documents in a seeded order are joined by EOS into one token stream and cut into blocks;
the blocks are then cut contiguously, so no document straddles more than one boundary per split:
target -> expert_train (50%), fit (25%), test (25%); general -> fit (50%), test (50%).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from raydapt.errors import UserError

__all__ = ["TEXT_SUFFIXES", "read_documents", "default_target", "default_general",
           "split_blocks", "build_splits", "save_split", "load_split"]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
TARGET_SPLITS = {"expert_train": 0.5, "target_fit": 0.25, "target_test": 0.25}
GENERAL_SPLITS = {"general_fit": 0.5, "general_test": 0.5}


def default_target() -> list[str]:
    """The Python docs' topic pages, in key order."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def default_general(max_chars: int = 3_000_000) -> list[str]:
    """Held-out stdlib sources (never pretrained on), up to `max_chars` in path order."""
    from raydapt.data.corpus import load_corpus
    out, total = [], 0
    for text in load_corpus().texts("held_out"):
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def read_documents(path: str, flag: str) -> list[str]:
    """Documents from a directory of text files, a .txt file, or a .jsonl/.csv/.parquet with `text`."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    elif p.is_file() and p.suffix in TEXT_SUFFIXES:
        docs = [p.read_text(encoding="utf-8", errors="replace")]
    elif p.is_file() and p.suffix in (".jsonl", ".csv", ".parquet"):
        docs = _text_column(p, flag)
    elif p.exists():
        raise UserError(f"--{flag} {p}: unsupported file type; accepted: a directory, "
                        f"{', '.join(TEXT_SUFFIXES)}, .jsonl, .csv or .parquet")
    else:
        raise UserError(f"--{flag} {p} does not exist")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"--{flag} {p} holds no text")
    return docs


def _text_column(path: Path, flag: str) -> list[str]:
    import datasets
    kind = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise UserError(f"--{flag} {path} cannot be read as {kind} ({str(e).splitlines()[0][:200]})")
    if "text" not in ds.column_names:
        raise UserError(f"--{flag} {path} has no \"text\" column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str)]


def _seeded_order(docs: list[str], seed: int) -> list[str]:
    """Documents ordered by a hash of (seed, content): the order does not depend on the input order."""
    def key(doc: str) -> str:
        return hashlib.sha256(f"{seed}\0{doc}".encode()).hexdigest()
    return sorted(docs, key=key)


def split_blocks(blocks: np.ndarray, fractions: dict[str, float], flag: str) -> dict[str, np.ndarray]:
    """Contiguous slices of `blocks` with the given fractions (every split gets at least one block)."""
    if len(blocks) < len(fractions):
        raise UserError(f"--{flag}: {len(blocks)} blocks of text, fewer than the {len(fractions)} splits "
                        f"({', '.join(fractions)}) need; give more text or a smaller --block")
    bounds = np.cumsum([0, *fractions.values()]) * len(blocks)
    cuts = [int(round(b)) for b in bounds]
    cuts = [max(min(c, len(blocks) - (len(cuts) - 1 - i)), i) for i, c in enumerate(cuts)]
    return {name: blocks[cuts[i]: cuts[i + 1]] for i, name in enumerate(fractions)}


def _cap(blocks: np.ndarray, tokens: int) -> np.ndarray:
    """The first rows holding about `tokens` tokens (all when tokens is 0), at least one row."""
    if tokens <= 0:
        return blocks
    return blocks[: max(1, tokens // blocks.shape[1])]


def _blocks(tokenizer, docs: list[str], seed: int, block: int) -> np.ndarray:
    from raydapt.pretrain import pack_blocks
    return pack_blocks(tokenizer, _seeded_order(docs, seed), block).astype(np.int32)


def build_splits(cfg, tokenizer) -> dict[str, np.ndarray]:
    """All five splits as (N, block) arrays; the fit set mixes in general text when --fit-mix > 0."""
    target = read_documents(cfg.target, "target") if cfg.target else default_target()
    general = read_documents(cfg.general, "general") if cfg.general else default_general()
    splits = split_blocks(_blocks(tokenizer, target, cfg.seed, cfg.block), TARGET_SPLITS, "target")
    splits |= split_blocks(_blocks(tokenizer, general, cfg.seed, cfg.block), GENERAL_SPLITS, "general")
    splits["expert_train"] = _cap(splits["expert_train"], cfg.train_tokens)
    for name in ("target_test", "general_test"):
        splits[name] = _cap(splits[name], cfg.test_tokens)
    splits["fit"] = _fit_set(splits, cfg)
    return splits


def _fit_set(splits: dict[str, np.ndarray], cfg) -> np.ndarray:
    """Target fit blocks, with a fraction `fit_mix` of the rows taken from general text instead."""
    target = _cap(splits["target_fit"], cfg.fit_tokens)
    n_general = int(round(cfg.fit_mix * len(target)))
    if n_general > len(splits["general_fit"]):
        raise UserError(f"--fit-mix {cfg.fit_mix}: needs {n_general} general blocks, the general domain "
                        f"has {len(splits['general_fit'])} for fitting")
    mixed = np.concatenate([target[: len(target) - n_general], splits["general_fit"][:n_general]])
    tokens = mixed.size - len(mixed)  # positions scored: every row loses its first token
    if tokens < cfg.combiner_batch:
        raise UserError(f"the fit set has {tokens} scored tokens, fewer than one combiner batch "
                        f"(--combiner-batch {cfg.combiner_batch}); give more target text or a smaller batch")
    return mixed


def save_split(path: Path, blocks: np.ndarray) -> None:
    """One split as a parquet file with an `input_ids` list column (a `datasets` Dataset)."""
    import datasets
    datasets.disable_progress_bars()
    tmp = path.with_name(f".{path.name}.tmp")
    datasets.Dataset.from_dict({"input_ids": blocks.tolist()}).to_parquet(str(tmp))
    tmp.replace(path)


def load_split(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq
    column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    return column.values.to_numpy().astype(np.int32).reshape(len(column), -1)
