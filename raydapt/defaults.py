"""Where raydapt keeps what it builds, and where its default models are found.

`jobs/pretrain.py` builds the default models into `$RAYDAPT_HOME/models/<name>`; a copy built with
the default recipe ships inside the package (`raydapt/assets/models/<name>`), so a fresh install
works without building anything.
"""
from __future__ import annotations

import os
from pathlib import Path

from raydapt.errors import UserError

__all__ = ["MODEL_NAMES", "raydapt_home", "assets_dir", "default_model_dir"]

MODEL_NAMES = ("large", "small")


def raydapt_home() -> Path:
    """`$RAYDAPT_HOME`, or `~/.cache/raydapt` when it is unset or empty."""
    home = os.environ.get("RAYDAPT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "raydapt"


def assets_dir() -> Path:
    """The files shipped inside the package (default checkpoints, the default task)."""
    return Path(__file__).resolve().parent / "assets"


def default_model_dir(name: str) -> Path:
    """The directory of default model `name` ("large" or "small").

    A model built locally (`$RAYDAPT_HOME/models/<name>/config.json` exists) wins over the shipped copy.
    A half-written build never has config.json there: builds are renamed into place when complete.
    """
    if name not in MODEL_NAMES:
        raise UserError(f"unknown default model {name!r}; accepted: {list(MODEL_NAMES)}")
    built = raydapt_home() / "models" / name
    if (built / "config.json").is_file():
        return built
    return assets_dir() / "models" / name
