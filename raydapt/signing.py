"""HMAC-SHA256 signatures for the files raydapt writes and later unpickles.

A checkpoint holds pickled pycma / nevergrad states, and unpickling runs whatever code the bytes
name. A resumed directory may come from anywhere (a shared bucket, another user), so a pickle is
loaded only when it carries a signature made with this installation's key: 32 random bytes in
`$RAYDAPT_HOME/keys/checkpoint.key`, created on first use with user-only permissions (file 0600,
folder 0700). Checking is `hmac.compare_digest`, done on the file's bytes before any unpickling.
Resuming on another machine needs that key file copied there (and kept private).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from raydapt.defaults import raydapt_home
from raydapt.errors import UserError

__all__ = ["key_path", "sign", "verify", "seal", "unseal"]

_KEY_BYTES = 32


def key_path() -> Path:
    return raydapt_home() / "keys" / "checkpoint.key"


def _create_key(path: Path) -> None:
    """Write a fresh key without ever exposing a partial or group-readable file.

    The key goes to a private temporary file that is then hard-linked to its name: linking fails if
    another process created the key first, and either way every reader sees a whole key.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)  # mkdir's mode is cut by the umask, and the folder may exist
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its key
    finally:
        tmp.unlink(missing_ok=True)


def _key() -> bytes:
    path = key_path()
    if not path.exists():
        _create_key(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UserError(f"{path}: the checkpoint key must be a file of yours readable by you only "
                        f"(mode 0600, found {stat.S_IMODE(info.st_mode):04o}); fix it with chmod 600 {path}")
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise UserError(f"{path}: the checkpoint key must be {_KEY_BYTES} bytes, found {len(key)}; "
                        "delete it to make a new one (checkpoints signed with the old key then cannot resume)")
    return key


def _mac(data: bytes) -> bytes:
    return hmac.new(_key(), data, hashlib.sha256).digest()


def sign(data: bytes) -> str:
    """The hex HMAC-SHA256 of `data` under this installation's key."""
    return _mac(data).hex()


def verify(data: bytes, signature: object) -> bool:
    """True when `signature` is this installation's HMAC of `data` (constant-time comparison)."""
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(data).encode(), signature.encode("utf-8", "replace"))


def seal(payload: bytes) -> bytes:
    """`payload` behind its HMAC-SHA256 (32 bytes), for bytes that `unseal` hands to an unpickler."""
    return _mac(payload) + payload


def unseal(data: bytes) -> bytes | None:
    """The payload `seal` wrapped, or None when its HMAC is not this installation's."""
    mac, payload = data[:32], data[32:]
    return payload if len(data) >= 32 and hmac.compare_digest(mac, _mac(payload)) else None
