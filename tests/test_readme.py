"""The README's Quick start stays true: its main-job command runs (without the pip installs, which
CI has just done) and prints the comparison table; CI runs the README's test command verbatim."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    main_job, tests = quick_start_commands()[:2]
    assert "pytest" in tests and "pytest" not in main_job
    assert tests in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.cluster
def test_quick_start_main_job_runs(tmp_path):
    main_job = quick_start_commands()[0]
    steps = [s.strip() for s in main_job.split("&&") if not s.strip().startswith("pip ")]
    assert len(steps) == 1
    argv = shlex.split(steps[0])
    assert argv[:2] == ["python", "jobs/gdfo.py"]
    result = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GDFO" in result.stdout and "BBT" in result.stdout and "manual prompt" in result.stdout
    assert (tmp_path / "runs" / "gdfo" / "gdfo" / "result.json").exists()
    assert (tmp_path / "runs" / "gdfo" / "comparison.json").exists()
