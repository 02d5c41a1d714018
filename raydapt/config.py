"""Typed job configs: a dataclass per job, validated on construction, round-tripped to JSON/YAML.

Each field's documentation is the `doc` entry of its metadata; `parse_args` turns the fields into
command-line flags whose help is that text, so `--help` always matches the code.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from raydapt.errors import UserError

__all__ = ["field", "parse_args", "to_dict", "from_dict", "save_config", "check", "check_positive",
           "check_directory", "help_text", "ArgumentParser"]

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


def check_directory(path: str, name: str, default: str) -> None:
    """An optional checkpoint-directory field: empty (the built `default`) or an existing directory.

    Checked on construction, so a mistyped --model fails in the first second, naming the flag,
    before anything reads the checkpoint (whose own checks say what is wrong inside it).
    """
    if path and not Path(path).is_dir():
        what = "is not a directory" if Path(path).exists() else "does not exist"
        check(False, name, f"{path} {what}; give a Hugging Face checkpoint directory, or leave "
              f"--{name.replace('_', '-')} out for {default}")


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


def _closest(name: str, known) -> str:
    """ " (did you mean 'popsize'?)" for the nearest known field (difflib), or "" when none is near."""
    near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def from_dict(cls: type[C], values: dict, source: str | None = None) -> C:
    """Build a config from a dict, rejecting unknown keys and converting types.

    `source` names where `values` came from (a YAML file), so an unknown key's error names it.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"--config: {source}" if source else "config"
        others = f"; also unknown: {', '.join(unknown[1:])}" if len(unknown) > 1 else ""
        raise UserError(f"{where}: unknown field {unknown[0]!r}{_closest(unknown[0], known)}{others}; "
                        f"accepted: {', '.join(sorted(known))}")
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


def help_text(f: dataclasses.Field) -> str:
    """A field's --help text: its doc, its accepted values, and its default, stated once.

    A doc that explains its own default ("default: the built-in task") gets no second one; any other
    default is shown as Python writes it, so an empty string reads '' and a newline reads '\\n'.
    """
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = f.metadata.get("doc", "")
    if f.metadata.get("choices"):
        text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
    if "default:" not in text.lower():
        text += f" [default: {default!r}]"
    return text.replace("%", "%%")  # argparse formats help with %


def parse_args(cls: type[C], argv: list[str] | None = None, description: str | None = None,
               presets: dict[str, dict] | None = None, prog: str | None = None) -> C:
    """Parse `argv` into `cls`. Precedence: defaults < preset flags (e.g. --quick) < --config YAML < flags.

    `presets` maps a flag name (e.g. "quick") to the field values it sets.
    """
    # The plain formatter: each field's help states its default once (see `help_text`); argparse's
    # ArgumentDefaultsHelpFormatter would add a second "(default: ...)" beside it.
    parser = ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    parser.add_argument("--config", type=Path, default=None, help="YAML file with field values (flags override it)")
    for name, values in (presets or {}).items():
        parser.add_argument(f"--{name}", action="store_true", help=f"preset: {values}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        extra = {"nargs": "?", "const": "true"} if _base_type(hints[f.name]) is bool else {}
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text(f), **extra)
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
    return from_dict(cls, values, source=str(config_path) if config_path is not None else None)
