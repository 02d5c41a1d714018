"""The open-book corpus and its BM25 index (bm25s), built once, saved, and loaded only for its corpus.

An index directory holds bm25s's own files plus `fingerprint.json`: the SHA-256 of the corpus it was
built from (every passage's id and text, in order) and the word splitter's version. Loading it for
another corpus is refused, naming both fingerprints: retrieving row numbers of one corpus from
another would silently hand the reader the wrong passages.

Words: runs of letters split at case changes and underscores, lower-cased, and digit runs
("getFilePosition", "get_file_position" -> get, file, position), so a docstring's words meet the
identifiers of a code passage. No stemming, no stop words (bm25s's IDF weighs them down).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydapt.errors import UserError

__all__ = ["WORDS_VERSION", "Corpus", "load_corpus_file", "words", "fingerprint", "build_index", "save_index",
           "check_index", "load_index", "open_index", "BruteForceBM25", "retrieve", "recall_at"]

WORDS_VERSION = "words-v1"
_WORD = re.compile(r"[A-Za-z][a-z]+|[A-Z]+(?![a-z])|[a-z]|\d+")


@dataclass
class Corpus:
    """Passages (parallel lists): ids and texts."""
    ids: list[str]
    texts: list[str]

    def row(self) -> dict[str, int]:
        """passage id -> row number"""
        return {pid: i for i, pid in enumerate(self.ids)}


def load_corpus_file(path: str | Path) -> Corpus:
    """Read a corpus.jsonl ({"id", "text"} rows); an empty or malformed file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus {path} does not exist; give a corpus.jsonl with one {{\"id\", \"text\"}} row a passage")
    ids, texts = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})")
        if not (isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("text"), str)):
            raise UserError(f"{path}:{n}: a passage must be an object with string fields id, text")
        ids.append(row["id"])
        texts.append(row["text"])
    if not ids:
        raise UserError(f"corpus {path} is empty; it needs at least one {{\"id\", \"text\"}} passage")
    if len(set(ids)) != len(ids):
        raise UserError(f"corpus {path}: passage ids must be distinct")
    return Corpus(ids, texts)


def words(text: str) -> list[str]:
    """The words BM25 matches on (see the module docstring)."""
    return [w.lower() for w in _WORD.findall(text)]


def fingerprint(corpus: Corpus) -> str:
    h = hashlib.sha256(WORDS_VERSION.encode())
    for pid, text in zip(corpus.ids, corpus.texts):
        h.update(b"\0" + pid.encode() + b"\0" + text.encode())
    return h.hexdigest()


def build_index(corpus: Corpus):
    import bm25s

    index = bm25s.BM25()
    index.index([words(t) or ["<empty>"] for t in corpus.texts], show_progress=False)
    return index


def save_index(index, corpus: Corpus, directory: str | Path) -> None:
    """bm25s's files, then the fingerprint last: a directory without it is not an index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fingerprint.json").unlink(missing_ok=True)
    index.save(str(directory))
    (directory / "fingerprint.json").write_text(json.dumps(
        {"corpus_sha256": fingerprint(corpus), "passages": len(corpus.ids), "words": WORDS_VERSION}) + "\n")


def check_index(directory: str | Path, corpus: Corpus) -> None:
    """Refuse the index saved in `directory` unless it was built from `corpus` (its fingerprint file only)."""
    directory = Path(directory)
    meta = directory / "fingerprint.json"
    if not meta.is_file():
        raise UserError(f"{directory} is not a saved index (no fingerprint.json); build one with --index-dir")
    saved = json.loads(meta.read_text())
    want = fingerprint(corpus)
    if saved.get("corpus_sha256") != want:
        raise UserError(f"index {directory} was built from another corpus ({saved.get('passages')} passages, "
                        f"sha256 {str(saved.get('corpus_sha256'))[:12]}...) than the one given "
                        f"({len(corpus.ids)} passages, sha256 {want[:12]}...); rebuild it or give its corpus")


def load_index(directory: str | Path, corpus: Corpus):
    """The index saved in `directory`, refused unless it was built from `corpus`."""
    import bm25s

    check_index(directory, corpus)
    return bm25s.BM25.load(str(directory))


def open_index(directory: str | Path, corpus: Corpus):
    """(index, built): the index saved in `directory` for `corpus`, or, when there is none yet, one
    built from `corpus` and saved there. An index of another corpus is refused (`load_index`)."""
    directory = Path(directory)
    if (directory / "fingerprint.json").is_file():
        return load_index(directory, corpus), False
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"index directory {directory} holds files but no fingerprint.json: not an index raydapt "
                        "saved (or a half-written one); give an empty or new directory")
    index = build_index(corpus)
    save_index(index, corpus, directory)
    return index, True


class BruteForceBM25:
    """BM25 by scanning every passage for each query: the brute-force reference the index is timed
    and checked against. bm25s's default ("lucene") scoring: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    term weight idf * tf / (tf + k1 (1 - b + b |d| / avg |d|)), summed over the query's words (a word
    that occurs twice in the query counts twice, as in bm25s).
    The passages' word counts are computed once; a query reads all of them."""

    def __init__(self, corpus_words: list[list[str]], k1: float = 1.5, b: float = 0.75):
        from collections import Counter

        self.counts = [Counter(w) for w in corpus_words]
        lengths = np.array([len(w) for w in corpus_words], np.float64)
        self.norm = k1 * (1 - b + b * lengths / lengths.mean())

    def scores(self, query: list[str]) -> np.ndarray:
        """(P,) the score of every passage."""
        n, out = len(self.counts), np.zeros(len(self.counts))
        from collections import Counter

        for word, times in Counter(query).items():
            tf = np.fromiter((c.get(word, 0) for c in self.counts), np.float64, n)
            df = int(np.count_nonzero(tf))
            if df:
                out += times * np.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + self.norm)
        return out


def retrieve(index, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (Q, k) int64, scores (Q, k) float32): the top-k passages of each question, best first."""
    rows, scores = index.retrieve([words(q) or ["<empty>"] for q in questions], k=k, show_progress=False,
                                  n_threads=1)
    return np.asarray(rows, np.int64), np.asarray(scores, np.float32)


def recall_at(rows: np.ndarray, gold: np.ndarray, ks=(1, 5, 20, 100)) -> dict[str, float]:
    """Share of questions whose gold passage row is among the first k retrieved, for each k."""
    return {str(k): float((rows[:, :k] == gold[:, None]).any(1).mean()) for k in ks if k <= rows.shape[1]}
