"""The pretraining corpus: the Python standard library's own .py sources.

Every machine with Python has this text, so raydapt can build its default models without a model or
dataset hub. The files are split, deterministically and by path only, into

- PRETRAIN: what the tokenizer and the default models are trained on;
- HELD-OUT: never seen in pretraining (neither by the tokenizer nor by the models): the files whose
  relative path hashes into the lowest `HELD_OUT_PERCENT` of 100 buckets, whole files. The held-out
  loss is measured on it and the default few-shot task is built from it
  (`raydapt.data.make_default_task`). 30% is more than a loss estimate needs; the task needs enough
  try/except blocks of each class, and the default build reads only ~14 MB of the ~20 MB left.

The split depends only on relative paths, so it is the same on every machine with the same Python
version; other versions ship slightly different files, hence a slightly different corpus.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from raydapt.errors import UserError

__all__ = ["HELD_OUT_PERCENT", "Corpus", "stdlib_dir", "discover_files",
           "is_held_out", "load_corpus", "read_text"]

HELD_OUT_PERCENT = 30

# Not prose or code a model should learn from: installed third-party packages, caches, codec and
# Unicode tables, the generated pydoc topic dump, test data written to be unparsable.
_SKIP_PARTS = {"site-packages", "__pycache__", "encodings", "pydoc_data", "data", "tokenizedata"}
_SKIP_NAMES = ("_sysconfigdata", "bad")
_SKIP_PREFIXES = ("test/test_unicodedata", "test/test_codecmaps")
_MAX_FILE_BYTES = 256 * 1024  # a few generated tables and huge test files; they would dominate


def stdlib_dir() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def discover_files(root: Path | None = None) -> list[str]:
    """Relative posix paths of the usable .py files under `root` (default: the stdlib), sorted."""
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise UserError(f"corpus root {root} is not a directory")
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if rel.name.startswith(_SKIP_NAMES) or rel.as_posix().startswith(_SKIP_PREFIXES):
            continue
        if path.stat().st_size > _MAX_FILE_BYTES or path.stat().st_size == 0:
            continue
        found.append(rel.as_posix())
    return sorted(found)


def is_held_out(relpath: str) -> bool:
    """Whether a file (relative posix path) belongs to the held-out part."""
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100
    return bucket < HELD_OUT_PERCENT


def read_text(path: Path) -> str | None:
    """A file's text, or None when it is not UTF-8 (a few tests ship deliberately broken files)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


@dataclass
class Corpus:
    """The split corpus: relative paths of each part, under `root`."""
    root: Path
    pretrain: list[str]
    held_out: list[str]

    def texts(self, part: str) -> list[str]:
        """The texts of "pretrain" or "held_out", in path order (unreadable files dropped)."""
        files = {"pretrain": self.pretrain, "held_out": self.held_out}[part]
        texts = (read_text(self.root / f) for f in files)
        return [t for t in texts if t]

    def stats(self) -> dict:
        """File counts and bytes per part, for recipes and reports."""
        def size(files):
            return sum((self.root / f).stat().st_size for f in files)
        return {"root": str(self.root), "pretrain_files": len(self.pretrain),
                "pretrain_bytes": size(self.pretrain), "held_out_files": len(self.held_out),
                "held_out_bytes": size(self.held_out)}


def load_corpus(root: Path | None = None) -> Corpus:
    """Discover the stdlib files and split them into pretrain and held-out parts."""
    root = Path(root) if root is not None else stdlib_dir()
    files = discover_files(root)
    if not files:
        raise UserError(f"no .py files found under {root}")
    held = [f for f in files if is_held_out(f)]
    return Corpus(root=root, pretrain=[f for f in files if not is_held_out(f)], held_out=held)
