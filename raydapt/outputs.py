"""Writing job outputs so that nothing half-written ever looks complete.

Every file is written under a temporary name in the same directory and renamed into place
(atomic on POSIX); the per-step log is append-only and cut back to the checkpoint on resume.

A checkpoint is a folder: `state-<hash>.safetensors` holds the state's arrays and byte strings as
tensors and everything else as JSON in its header; `index.json`, renamed into place last, names
that file and carries its HMAC (`raydapt.signing`). Byte strings may be pickles (optimizer states),
so a checkpoint loads only when the HMAC over the file's bytes checks out, before anything in it is
parsed. A crash leaves the previous index and its file intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from raydapt.errors import UserError

__all__ = ["write_atomic", "check_parquet_output", "write_json", "read_json", "calls_to_reach", "announce_output", "progress_bar", "write_result", "save_checkpoint", "load_checkpoint", "has_checkpoint",
           "append_jsonl", "read_jsonl", "truncate_jsonl", "save_tensors"]

CHECKPOINT_FORMAT = "raydapt-checkpoint/1"
_STATE_FILE = re.compile(r"state-[0-9a-f]{16}\.safetensors")
_LEGACY = "checkpoint.pkl"  # what raydapt wrote before checkpoints were signed: never unpickled


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_parquet_output(path: Path) -> None:
    """--output must be a writable .parquet path in an existing directory: checked before any work."""
    if path.suffix != ".parquet":
        raise UserError(f"--output: {path} must end in .parquet")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--output: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"--output: {path} cannot be written (permission denied)")


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True, default=_plain) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: Path, row: dict) -> None:
    """One row, one write of one line ending in a newline, fsynced before the checkpoint that counts it."""
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=_plain) + "\n")
        f.flush()
        os.fsync(f.fileno())


def announce_output(out: Path) -> None:
    """Say where a job writes, as an absolute path: a submitted job's relative --output-dir lands in
    Ray's unpacked working directory on the head, and its log is where a user finds that out."""
    print(f"output directory: {Path(out).resolve()}", file=sys.stderr, flush=True)


def progress_bar(total: int, initial: int, desc: str, unit: str = "call"):
    """A tqdm bar with an ETA on stderr. Off a terminal (a submitted job's log) it redraws every 30 s
    instead of 10 times a second, so the log gets a line per half minute, not thousands."""
    from tqdm.auto import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.1 if tty else 30.0, smoothing=0.1)


def write_result(out: Path, result: dict) -> None:
    """result.json, written last (a directory with it holds a finished run), and where it went."""
    write_json(Path(out) / "result.json", result)
    print(f"finished: {Path(out).resolve() / 'result.json'}", file=sys.stderr, flush=True)


def calls_to_reach(log: list[dict], target: float) -> int | None:
    """API calls at the first dev scoring of a search log that reached `target` accuracy, or None."""
    return next((r["api_calls"] for r in log if r.get("dev_accuracy", -1) >= target), None)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl log. A final line cut short by a kill mid-write (no newline, not valid
    JSON) is not a row and is left out; a broken line anywhere else is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated tail: a torn write
                break
            raise ValueError(f"{path}: line {number} is not JSON")
    return rows


def truncate_jsonl(path: Path, rows: int) -> None:
    """Keep the first `rows` complete lines: rows written after the last checkpoint, and a line torn
    by a kill, are redone on resume. Fewer complete lines than `rows` means the log lost rows the
    checkpoint counts: an error, not a silently shorter log."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    complete = data.split(b"\n")[:-1]  # the part after the last newline is empty or torn
    if len(complete) < rows:
        raise UserError(f"--resume: {path} has {len(complete)} complete rows but the checkpoint covers {rows}; "
                        "the log was cut or replaced, so this run cannot be continued")
    kept = b"".join(line + b"\n" for line in complete[:rows])
    if kept != data:
        write_atomic(path, kept)


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Write `state` (arrays, bytes, JSON values, and lists / tuples / str-keyed dicts of them) to the
    checkpoint folder `directory`, signed; the previous checkpoint stays valid until the index moves."""
    from safetensors.numpy import save

    from raydapt.signing import sign

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    header = json.dumps(_encode(state, tensors, "state"), sort_keys=True)
    data = save(tensors, metadata={"raydapt": header})
    name = f"state-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    write_atomic(directory / name, data)
    write_json(directory / "index.json", {"format": CHECKPOINT_FORMAT, "file": name, "hmac_sha256": sign(data)})
    for old in directory.iterdir():  # earlier states and temporary files of killed writers
        if old.name != name and old.name != "index.json" and (_STATE_FILE.fullmatch(old.name) or ".tmp-" in old.name):
            old.unlink(missing_ok=True)


def has_checkpoint(directory: Path) -> bool:
    """True when `directory` holds a checkpoint this installation signed; False when it holds none.

    Anything else there (a legacy or foreign `checkpoint.pkl`, a missing or wrong signature) raises
    the one UserError of `load_checkpoint`, so a job refuses it before it starts any worker."""
    directory = Path(directory)
    if (directory / "index.json").exists() or (directory.parent / _LEGACY).exists():
        load_checkpoint(directory)
        return True
    return False


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """The state `save_checkpoint` wrote, after checking its signature; never unpickles anything."""
    from safetensors.numpy import load

    from raydapt.signing import verify

    directory = Path(directory)
    legacy = directory.parent / _LEGACY
    index_path = directory / "index.json"
    if not index_path.exists() and legacy.exists():
        raise _unsigned(legacy)
    try:
        index = json.loads(index_path.read_text())
        name = index["file"]
        ok = index.get("format") == CHECKPOINT_FORMAT and isinstance(name, str) and _STATE_FILE.fullmatch(name)
    except (OSError, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise _unsigned(index_path)
    path = directory / name
    try:
        data = path.read_bytes()
    except OSError:
        raise UserError(f"--resume: {path}, named by {index_path}, cannot be read")
    if not verify(data, index.get("hmac_sha256")):  # before anything reads the bytes
        raise _unsigned(path)
    tensors = load(data)
    header = json.loads(_header_metadata(data)["raydapt"])
    return _decode(header, tensors)


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


def _unsigned(path: Path) -> UserError:
    return UserError(f"--resume: {path} was not written by this raydapt installation (signature missing or wrong); "
                     "refusing to unpickle it")


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (an 8-byte length, then a JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


# JSON stands for itself; arrays, byte strings and tuples become tagged objects that name a tensor.
_TAGS = ("__array__", "__bytes__", "__tuple__")


def _encode(value: Any, tensors: dict[str, np.ndarray], key: str) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"checkpoint field {key}: object arrays cannot be stored")
        tensors[key] = np.ascontiguousarray(value)
        return {"__array__": key}
    if isinstance(value, (bytes, bytearray)):
        tensors[key] = np.frombuffer(bytes(value), dtype=np.uint8)
        return {"__bytes__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) and k not in _TAGS for k in value):
            raise TypeError(f"checkpoint field {key}: dict keys must be strings other than {_TAGS}")
        return {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint field {key}: cannot store a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__array__" in value:
            return np.array(tensors[value["__array__"]])  # a writable copy
        if "__bytes__" in value:
            return tensors[value["__bytes__"]].tobytes()
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value
