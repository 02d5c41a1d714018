"""Writing job outputs so that nothing half-written ever looks complete.

Every file is written under a temporary name in the same directory and renamed into place
(atomic on POSIX); the per-step log is append-only and cut back to the checkpoint on resume.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_atomic", "write_json", "read_json", "save_pickle", "load_pickle", "append_jsonl",
           "read_jsonl", "truncate_jsonl", "save_tensors"]


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True, default=_plain) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_pickle(path: Path, value: Any) -> None:
    write_atomic(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)  # only ever our own checkpoint, written by this code


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=_plain) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, rows: int) -> None:
    """Keep the first `rows` rows: lines written after the last checkpoint are redone on resume."""
    if Path(path).exists():
        kept = Path(path).read_text().splitlines()[:rows]
        write_atomic(path, "".join(line + "\n" for line in kept).encode())


def save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save

    # One key holding sorted JSON: safetensors writes several metadata keys in hash-map order, which
    # changes from process to process, and identical prompts must give identical files.
    header = {"raydapt": json.dumps(metadata, sort_keys=True)} if metadata else None
    write_atomic(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=header))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
