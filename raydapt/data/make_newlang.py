"""The new-language corpus of neutral residues' experiment, built from text every Linux machine has.

The default large LM learned Python source and the English inside it; it has seen no French. The OS's
gettext catalogs (`/usr/share/locale/<lang>/LC_MESSAGES/*.mo`) hold real French written by people:
the translations of every installed program's messages. This recipe reads them (a small .mo parser,
no third-party package), keeps each distinct translated message once, and splits them by a hash of
the text into train / dev / test (90 / 5 / 5), so the split is the same whatever order or subset of
catalogs a machine has.

Built at run time, not shipped: the catalogs come under as many licences as there are packages
(GPL, LGPL, BSD, ...), and an extract would redistribute all of them inside raydapt; the recipe is a
few hundred milliseconds and records what it read (catalogs, messages, characters, a SHA-256 of the
corpus), so two runs can tell whether they trained on the same text.

The two original-domain sources (Signe Talla et al. mix Wikipedia in and measure forgetting on
PubMed): the mix is the held-out part of the stdlib (never seen in pretraining, `raydapt.data.corpus`);
forgetting is measured on Python source the model has never seen either, of a fixed list of
third-party packages that raydapt itself depends on (so they are installed wherever it runs).

    python -m raydapt.data.make_newlang            # prints the statistics of this machine's corpus
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from raydapt.errors import UserError

__all__ = ["DEFAULT_LOCALE_DIR", "EVAL_PACKAGES", "read_mo", "new_language_corpus", "original_mix_texts",
           "original_eval_texts", "read_user_texts", "split_of", "NewLanguage"]

DEFAULT_LOCALE_DIR = "/usr/share/locale"
# Forgetting is measured on these packages' own .py files (raydapt's dependencies: always installed).
EVAL_PACKAGES = ("yaml", "tqdm", "cma")
_EVAL_MAX_CHARS = 1_500_000
SPLIT_PERCENT = {"test": 5, "dev": 5}  # the rest is train
_MIN_CHARS = 12  # shorter messages ("Oui", "%s : %s") teach the language little


def read_mo(path: Path) -> list[str]:
    """The translated messages (msgstr, plural forms split) of a GNU .mo file; [] if unreadable.

    Format (GNU gettext manual, "The Format of GNU MO Files"): magic, revision, N, offset of the
    original-string table, offset of the translation table; each table entry is (length, offset).
    """
    try:
        data = Path(path).read_bytes()
        magic = struct.unpack("<I", data[:4])[0]
        order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
        if order is None:
            return []
        n, _, trans_at = struct.unpack(order + "3I", data[8:20])
        entries = [struct.unpack(order + "2I", data[trans_at + 8 * i: trans_at + 8 * i + 8]) for i in range(n)]
        raw = [data[off: off + length] for length, off in entries]
    except (OSError, struct.error):
        return []
    header = raw[0].decode("ascii", "replace") if raw and raw[0] else ""
    charset = "utf-8"
    for line in header.splitlines():
        if "charset=" in line:
            charset = line.split("charset=", 1)[1].strip() or "utf-8"
    texts = []
    for i, message in enumerate(raw):
        if i == 0 and message.startswith(b"Project-Id-Version") or b"Content-Type:" in message[:400]:
            continue  # the catalog's header entry
        try:
            decoded = message.decode(charset)
        except (UnicodeDecodeError, LookupError):
            continue
        texts += [t for t in decoded.split("\x00") if t.strip()]
    return texts


def split_of(text: str) -> str:
    """'train', 'dev' or 'test', from the text's SHA-256 alone."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100
    if bucket < SPLIT_PERCENT["test"]:
        return "test"
    return "dev" if bucket < SPLIT_PERCENT["test"] + SPLIT_PERCENT["dev"] else "train"


@dataclass
class NewLanguage:
    """A split new-language corpus and where it came from."""
    splits: dict[str, list[str]]
    source: dict

    def stats(self) -> dict:
        return {**self.source, **{f"{s}_texts": len(t) for s, t in self.splits.items()},
                **{f"{s}_chars": sum(map(len, t)) for s, t in self.splits.items()}}


def _split(texts: list[str], source: dict) -> NewLanguage:
    splits = {"train": [], "dev": [], "test": []}
    for t in texts:
        splits[split_of(t)].append(t)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    return NewLanguage(splits, {**source, "texts": len(texts), "sha256": digest})


def new_language_corpus(language: str = "fr", locale_dir: str = DEFAULT_LOCALE_DIR) -> NewLanguage:
    """Every distinct translated message of `locale_dir/<language>/LC_MESSAGES/*.mo`, split.

    Messages are ordered by their hash (not by catalog), so neighbouring messages come from
    different programs; UserError when there is no catalog (give --new-domain then).
    """
    where = Path(locale_dir) / language / "LC_MESSAGES"
    catalogs = sorted(where.glob("*.mo")) if where.is_dir() else []
    texts: set[str] = set()
    for path in catalogs:
        texts.update(t.strip() for t in read_mo(path) if len(t.strip()) >= _MIN_CHARS)
    if not texts:
        raise UserError(f"--new-domain: no gettext catalogs with {language!r} text under {where}; give a "
                        "new-language corpus with --new-domain (a directory or a text/jsonl/parquet file)")
    ordered = sorted(texts, key=lambda t: hashlib.sha256(t.encode()).digest())
    return _split(ordered, {"source": "gettext", "language": language, "catalogs": len(catalogs),
                            "where": str(where)})


def read_user_texts(path: str, flag: str) -> list[str]:
    """Texts from a directory (every file, sorted, as text), a .jsonl ("text" per line), a .parquet
    ("text" column) or any other file (one text). UserError naming `flag` when missing or empty."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--{flag}: {path} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        texts = [_read(f) for f in files]
    elif p.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"--{flag}: {path} line {number}: not valid JSON")
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"--{flag}: {path} line {number}: needs a \"text\" string")
            texts.append(row["text"])
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(p)
        except Exception as e:  # pyarrow raises several kinds for a broken file
            raise UserError(f"--{flag}: {path} is not a readable parquet file ({str(e).splitlines()[0]})")
        if "text" not in table.column_names:
            raise UserError(f"--{flag}: {path} has no \"text\" column (columns: {table.column_names})")
        texts = [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    else:
        texts = [_read(p)]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError(f"--{flag}: {path} holds no text")
    return texts


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def user_new_language(path: str) -> NewLanguage:
    return _split(read_user_texts(path, "new-domain"), {"source": str(Path(path).resolve())})


def original_mix_texts() -> list[str]:
    """The held-out stdlib files (never seen in pretraining): the original-domain-like mix."""
    from raydapt.data.corpus import load_corpus
    return load_corpus().texts("held_out")


def original_eval_texts() -> list[str]:
    """The .py files of EVAL_PACKAGES (sorted paths, tests skipped), up to _EVAL_MAX_CHARS in all."""
    texts, total = [], 0
    for name in EVAL_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for f in sorted(root.rglob("*.py")):
            if "test" in f.relative_to(root).as_posix() or total >= _EVAL_MAX_CHARS:
                continue
            text = _read(f)
            if text.strip():
                texts.append(text)
                total += len(text)
    if not texts:
        raise UserError(f"--original-eval: none of {list(EVAL_PACKAGES)} is installed; give an "
                        "original-domain evaluation corpus with --original-eval")
    return texts


def main(argv=None) -> None:
    corpus = new_language_corpus(*(argv or sys.argv[1:2] or ["fr"]))
    print(json.dumps({**corpus.stats(), "original_mix_texts": len(original_mix_texts()),
                      "original_eval_texts": len(original_eval_texts())}, indent=1))


if __name__ == "__main__":
    main()
