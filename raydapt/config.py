"""Typed job configs: a dataclass per job, validated on construction, round-tripped to JSON/YAML.

Each field's documentation is the `doc` entry of its metadata; `parse_args` turns the fields into
command-line flags whose help is that text, so `--help` always matches the code.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from raydapt.errors import UserError

__all__ = ["field", "parse_args", "to_dict", "from_dict", "save_config", "check", "check_positive",
           "ArgumentParser"]

C = TypeVar("C")


def field(default: Any, doc: str, choices: tuple | None = None, **kwargs) -> Any:
    """A config field with its help text (and, optionally, the accepted values)."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def check(ok: bool, name: str, message: str) -> None:
    """Raise a UserError naming the field when a validation fails."""
    if not ok:
        raise UserError(f"--{name.replace('_', '-')}: {message}")


def check_positive(value: float, name: str, strict: bool = True) -> None:
    """A finite number > 0 (strict) or >= 0: NaN and infinity are refused too, naming the field."""
    ok = math.isfinite(value) and (value > 0 if strict else value >= 0)
    check(ok, name, f"must be a finite number {'>' if strict else '>='} 0, got {value}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, missing value, bad choice) are one `error: ...` line.

    Stock argparse prints its usage first and exits itself; raising a UserError instead lets
    `exit_on_user_error` print the same single line and exit status 2 as every other bad input.
    """

    def error(self, message: str):
        raise UserError(message)


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `Optional[str]` -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _convert(value: Any, tp: Any, name: str) -> Any:
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return base(value)
        return value
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')}: expected {getattr(base, '__name__', base)}, got {value!r}")


def from_dict(cls: type[C], values: dict) -> C:
    """Build a config from a dict, rejecting unknown keys and converting types."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown config field(s) {unknown}; accepted: {sorted(known)}")
    kwargs = {k: _convert(v, hints[k], k) for k, v in values.items()}
    for k, v in kwargs.items():
        choices = known[k].metadata.get("choices")
        if choices and v not in choices:
            raise UserError(f"--{k.replace('_', '-')}: {v!r} is not one of {list(choices)}")
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def parse_args(cls: type[C], argv: list[str] | None = None, description: str | None = None,
               presets: dict[str, dict] | None = None, prog: str | None = None) -> C:
    """Parse `argv` into `cls`. Precedence: defaults < preset flags (e.g. --quick) < --config YAML < flags.

    `presets` maps a flag name (e.g. "quick") to the field values it sets.
    """
    parser = ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with field values")
    for name, values in (presets or {}).items():
        parser.add_argument(f"--{name}", action="store_true", help=f"preset: {values}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            help_text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, nargs="?", const="true",
                                help=f"{help_text} [default: {default}]")
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=f"{help_text} [default: {default}]")
    ns = vars(parser.parse_args(argv))
    values: dict = {}
    for name, preset in (presets or {}).items():
        if ns.pop(name, False):
            values.update(preset)
    config_path = ns.pop("config")
    if config_path is not None:
        if not config_path.is_file():
            raise UserError(f"--config: {config_path} is not a file")
        try:
            loaded = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config: {config_path} is not valid YAML ({str(e).splitlines()[0]})")
        if not isinstance(loaded, dict):
            raise UserError(f"--config: {config_path} must hold a mapping of field: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(ns)
    return from_dict(cls, values)
