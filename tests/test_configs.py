"""Every shipped YAML config parses into every job config it is meant for; --help documents every field."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from raydapt.bbt.config import QUICK, BBTConfig
from raydapt.comblm.config import CombLMConfig
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
    with pytest.raises(UserError, match="--temperature: must be a finite number > 0, got 0.0"):
        parse_args(GDFOConfig, ["--temperature", "0"])
    with pytest.raises(UserError, match="--student-lr: must be >= 0"):
        parse_args(GDFOConfig, ["--student-lr", "-1"])
    path.write_text("popsiz: 3\n")
    with pytest.raises(UserError) as e:
        parse_args(BBTConfig, ["--config", str(path)])
    assert str(e.value).startswith(f"--config: {path}: unknown field 'popsiz' (did you mean 'popsize'?); "
                                   "accepted: alpha, bound, budget,"), str(e.value)
    path.write_text("popsiz: 3\nzzz_qqq: 1\n")  # nothing is near zzz_qqq: no suggestion for it
    with pytest.raises(UserError) as e:
        parse_args(GDFOConfig, ["--config", str(path)])
    assert "unknown field 'popsiz' (did you mean 'popsize'?); also unknown: zzz_qqq; accepted:" in str(e.value)


def test_missing_checkpoint_directories_name_their_flag(tmp_path):
    for cls, name in ((BBTConfig, "model"), (GDFOConfig, "student"), (CombLMConfig, "model"), (CombLMConfig, "expert")):
        with pytest.raises(UserError) as e:
            cls(**{name: str(tmp_path / "nope")})
        assert str(e.value).startswith(f"--{name}: {tmp_path / 'nope'} does not exist; "), str(e.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^--model: .*/file is not a directory"):
        BBTConfig(model=str(tmp_path / "file"))
    assert BBTConfig(model=str(tmp_path)).model == str(tmp_path)  # a directory passes (its content is the job's check)


def test_every_field_has_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(GDFOConfig, ["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(GDFOConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f.metadata.get("doc")


@pytest.mark.parametrize("cls", [BBTConfig, GDFOConfig, CombLMConfig])
def test_help_states_each_default_once(cls, capsys):
    from raydapt.config import help_text

    with pytest.raises(SystemExit):
        parse_args(cls, ["--help"], presets={"quick": {}})
    out = capsys.readouterr().out
    text = "".join(out.split())  # argparse wraps lines (and breaks at hyphens): compare without whitespace
    assert "(default: None)" not in out and "(default: False)" not in out  # argparse's own, gone
    for f in dataclasses.fields(cls):
        entry = help_text(f)
        assert "".join(entry.replace("%%", "%").split()) in text
        assert entry.lower().count("default:") == 1, entry  # the doc's own, or the one appended
    # The placeholder's default, a newline, is written as Python writes it; an empty default reads ''.
    if cls is not CombLMConfig:
        assert "(BBT's p0) [default: '\\n']" in " ".join(out.split())
        assert "[default: '']" in " ".join(out.split())  # --fault-injection
    assert out.count("default:") == len(dataclasses.fields(cls))  # --config and --quick state none


@pytest.mark.parametrize("cls, values, message", [
    (BBTConfig, {"log_every": 0}, "--log-every: must be >= 1, got 0"),
    (BBTConfig, {"alpha": 0.0}, "--alpha: must be a finite number > 0, got 0.0"),
    (BBTConfig, {"alpha": float("inf")}, "--alpha: must be a finite number > 0, got inf"),
    (BBTConfig, {"cpus_per_stage": 0.0}, "--cpus-per-stage: must be a finite number > 0, got 0.0"),
    (BBTConfig, {"gpus_per_stage": -0.5}, "--gpus-per-stage: must be a finite number >= 0, got -0.5"),
    (BBTConfig, {"verbalizer": " a, b"}, "--verbalizer: needs --task"),
    (BBTConfig, {"task": "t.csv", "verbalizer": " a"}, "--verbalizer: needs a word for each of at least 2 classes"),
    (GDFOConfig, {"replay": -1}, "--replay: must be >= 0, got -1"),
    (CombLMConfig, {"cpus_per_stage": -1.0}, "--cpus-per-stage: must be a finite number > 0, got -1.0"),
    (CombLMConfig, {"cpus_per_worker": 0.0}, "--cpus-per-worker: must be a finite number > 0, got 0.0"),
])
def test_configs_validate_on_construction(cls, values, message):
    with pytest.raises(UserError) as e:
        cls(**values)
    assert str(e.value).startswith(message), str(e.value)


def test_argparse_errors_are_user_errors():
    # Stock argparse would print its usage and exit; one `error:` line needs a UserError instead.
    with pytest.raises(UserError, match="unrecognized arguments: --no-such-flag"):
        parse_args(BBTConfig, ["--no-such-flag", "1"])
    with pytest.raises(UserError, match="--popsize: expected int, got 'ten'"):
        parse_args(BBTConfig, ["--popsize", "ten"])
