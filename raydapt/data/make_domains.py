"""The multi-domain task distribution of MLtD (Hou, Salazar, Polovets, TACL 2022), built from text on
this machine. One domain is one task; domains differ in kind and in language:

- code: one domain per standard-library package (CODE_DOMAINS), read only from the corpus's
  held-out files (`raydapt.data.corpus.is_held_out`), which no default model saw in pretraining;
- prose: the gettext catalogs of one language each (PROSE_LANGUAGES, `raydapt.data.make_newlang`),
  and `pydoc`, the Python documentation's topic pages (`pydoc_data.topics`).

Held-out rule (meta-test domains), fixed and name-based so no result can pick it: within each kind,
domains are ordered by the SHA-256 of their name and the first quarter (at least one) is held out;
the rest are meta-train. A user directory of domains (`--domains-dir`: one file or subdirectory per
domain) gets the same rule as one kind of its own.

A domain's texts are ordered by their SHA-256, joined with the end token and cut into sequences of
`context` tokens; its test split is the first `test` sequences of that stream and its train split the
`train` after them, so the two never share a token, the test split does not depend on the train size,
and a smaller train split is a prefix of a larger one (the low-data curve compares nested sets). Built at run time, not shipped (the catalogs
come under as many licences as packages); `stats` records what was read, with a digest per domain.

    python -m raydapt.data.make_domains          # prints the domains, their split and sizes
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydapt.errors import UserError

__all__ = ["CODE_DOMAINS", "PROSE_LANGUAGES", "Domain", "held_out_names", "domain_texts", "build_domains",
           "all_domain_names"]

CODE_DOMAINS = ("asyncio", "ctypes", "distutils", "email", "http", "idlelib", "importlib", "lib2to3",
                "multiprocessing", "tkinter", "unittest", "urllib", "xml")
PROSE_LANGUAGES = ("cs", "de", "es", "fr", "it", "nl", "pl", "pt_BR", "ru", "sv")
_CHARS_PER_TOKEN = 8  # a generous bound (code ~3, other scripts less): how much text a domain reads


@dataclass
class Domain:
    """One task: its kind, train (n, T) and test (m, T) token sequences, and where they came from."""
    name: str
    kind: str
    train: np.ndarray
    test: np.ndarray
    source: dict


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def held_out_names(names: list[str]) -> list[str]:
    """The meta-test domains of one kind: the first quarter (>= 1) by SHA-256 of the name."""
    ordered = sorted(names, key=_digest)
    return sorted(ordered[:max(1, round(len(ordered) / 4))])


def all_domain_names(domains_dir: str = "") -> dict[str, list[str]]:
    """{kind: domain names} of the recipe, or of a user directory (kind "user")."""
    if domains_dir:
        entries = sorted(p.stem for p in Path(domains_dir).iterdir() if not p.name.startswith("."))
        if len(entries) < 2:
            raise UserError(f"--domains-dir: {domains_dir} holds {len(entries)} domain(s); MLtD needs at least 2 "
                            "(one file or subdirectory each)")
        return {"user": entries}
    return {"code": list(CODE_DOMAINS), "prose": [f"gettext-{lang}" for lang in PROSE_LANGUAGES] + ["pydoc"]}


@functools.lru_cache(maxsize=1)
def _corpus():
    from raydapt.data.corpus import load_corpus
    return load_corpus()


def domain_texts(name: str, kind: str, domains_dir: str = "", max_chars: int = 400_000) -> tuple[list[str], dict]:
    """The texts of one domain (ordered by hash, at most `max_chars`) and a record of their source.
    Gettext catalogs are read in name order until twice `max_chars` of messages are in hand."""
    if kind == "user":
        from raydapt.data.make_newlang import read_user_texts
        path = next(p for p in Path(domains_dir).iterdir() if p.stem == name)
        texts, source = read_user_texts(str(path), "domains-dir"), {"source": str(path.resolve())}
    elif kind == "code":
        from raydapt.data.corpus import read_text
        corpus = _corpus()
        files = [f for f in corpus.held_out if f.startswith(name + "/")]
        texts = [t for t in (read_text(corpus.root / f) for f in files) if t]
        source = {"source": "stdlib held-out files", "package": name, "files": len(files)}
    elif name == "pydoc":
        from pydoc_data.topics import topics
        texts, source = list(topics.values()), {"source": "pydoc_data.topics", "topics": len(topics)}
    else:
        from raydapt.data.make_newlang import DEFAULT_LOCALE_DIR, read_mo
        where = Path(DEFAULT_LOCALE_DIR) / name.removeprefix("gettext-") / "LC_MESSAGES"
        catalogs = sorted(where.glob("*.mo")) if where.is_dir() else []
        found: set[str] = set()
        read = 0
        for catalog in catalogs:
            if sum(map(len, found)) >= 2 * max_chars:
                break
            found.update(t.strip() for t in read_mo(catalog) if len(t.strip()) >= 12)
            read += 1
        texts = sorted(found)
        source = {"source": "gettext", "where": str(where), "catalogs": read}
    texts = sorted(texts, key=lambda t: hashlib.sha256(t.encode()).digest())
    kept, total = [], 0
    for t in texts:
        if total >= max_chars:
            break
        kept.append(t)
        total += len(t)
    return kept, {**source, "texts": len(kept), "chars": total,
                  "sha256": hashlib.sha256("\x00".join(kept).encode()).hexdigest()[:16]}


def _sequences(texts: list[str], tokenizer, context: int, limit: int) -> np.ndarray:
    """Up to `limit` sequences (n, context) of the end-token-joined texts."""
    eos, ids = tokenizer.eos_token_id, []
    for start in range(0, len(texts), 128):
        for row in tokenizer(texts[start:start + 128], add_special_tokens=False, verbose=False)["input_ids"]:
            ids += row + ([eos] if eos is not None else [])
        if len(ids) >= limit * context:
            break
    n = min(limit, len(ids) // context)
    return np.asarray(ids[:n * context], dtype=np.int64).reshape(n, context)


def build_domains(tokenizer, context: int, train: int, test: int, domains_dir: str = "",
                  meta_train: int | None = None, wanted=None) -> tuple[list[Domain], list[Domain]]:
    """(meta-train domains, meta-test domains). Held-out domains get `train` training sequences,
    meta-train ones `meta_train` (default `train`); each at most, fewer when the text runs out.
    `wanted(name, held_out) -> bool` skips reading the domains a run does not use (default: all)."""
    kinds = all_domain_names(domains_dir)
    train_side, test_side = [], []
    for kind, names in kinds.items():
        held = set(held_out_names(names))
        for name in names:
            if wanted is not None and not wanted(name, name in held):
                continue
            n_train = train if name in held else (meta_train or train)
            texts, source = domain_texts(name, kind, domains_dir, (n_train + test) * context * _CHARS_PER_TOKEN)
            seqs = _sequences(texts, tokenizer, context, n_train + test) if texts else np.zeros((0, context), np.int64)
            # A domain that ran out of text still keeps train and test apart; one that did not always has `test`.
            n_test = test if len(seqs) >= n_train + test else min(test, len(seqs) // 2)
            domain = Domain(name, kind, seqs[n_test:n_test + n_train], seqs[:n_test], source)
            (test_side if name in held else train_side).append(domain)
    return train_side, test_side


def main(argv=None) -> None:
    from raydapt.defaults import default_model_dir
    from raydapt.models.checkpoint import load_tokenizer
    tokenizer = load_tokenizer(str(default_model_dir("large")))
    meta_train, meta_test = build_domains(tokenizer, 128, 500, 64)
    print(json.dumps({"held_out_rule": "per kind, the first quarter of the names by SHA-256",
                      "meta_train": {d.name: [len(d.train), len(d.test), d.source] for d in meta_train},
                      "meta_test": {d.name: [len(d.train), len(d.test), d.source] for d in meta_test}}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
