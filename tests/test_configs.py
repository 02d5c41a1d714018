"""Every shipped YAML config parses into every job config it is meant for; --help documents every field."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from raydapt.bbt.config import QUICK, BBTConfig
from raydapt.config import parse_args
from raydapt.errors import UserError
from raydapt.gdfo.config import GDFOConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("cls", [BBTConfig, GDFOConfig])
def test_shipped_configs_parse(path, cls):
    cfg = parse_args(cls, ["--config", str(path)])
    assert cfg.budget >= cfg.popsize


def test_quick_file_equals_quick_flag():
    path = next(p for p in CONFIGS if p.name == "quick.yaml")
    assert parse_args(BBTConfig, ["--config", str(path)]) == parse_args(BBTConfig, ["--quick"], presets={"quick": QUICK})


def test_flags_override_file_and_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("popsize: 12\nbudget: 100\n")
    assert parse_args(BBTConfig, ["--config", str(path), "--popsize", "14"]).popsize == 14
    with pytest.raises(UserError, match="--temperature: must be > 0"):
        parse_args(GDFOConfig, ["--temperature", "0"])
    with pytest.raises(UserError, match="--student-lr: must be >= 0"):
        parse_args(GDFOConfig, ["--student-lr", "-1"])
    path.write_text("popsiz: 3\n")
    with pytest.raises(UserError, match="unknown config field"):
        parse_args(BBTConfig, ["--config", str(path)])


def test_every_field_has_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(GDFOConfig, ["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(GDFOConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f.metadata.get("doc")
