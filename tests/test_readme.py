"""The README's Quick start stays true: its main-job command runs (without the pip installs, which
CI has just done) and prints the comparison table; CI runs the README's test command verbatim; its
own-task example runs verbatim on a task file the test writes."""
from __future__ import annotations

import csv
import json
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


def own_task_command() -> str:
    """The one bash block of the README's "Your own task" paragraph, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("Your own task:", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)
    assert len(blocks) >= 1, "the own-task paragraph lost its example"
    return blocks[0]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.slow
def test_own_task_example_runs_verbatim(tmp_path):
    argv = shlex.split(own_task_command())
    assert argv[:2] == ["python", "jobs/bbt.py"] and "\n" not in own_task_command()
    task, k = _flag(argv, "--task"), int(_flag(argv, "--k-shot"))
    # The task file it names: string labels (the README's words are in their sorted order,
    # negative then positive), k for train and k for dev per class, and 8 more per class for test.
    per_class = 2 * k + 8
    with open(tmp_path / task, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(per_class):
            writer.writerow([f"Review {i}: it broke within a week.", "negative"])
            writer.writerow([f"Review {i}: it works well and I would buy it again.", "positive"])
    # Appended, and only these: --quick and --budget shorten the search (popsize, d, L, 120 calls; an
    # explicit flag such as the README's --k-shot still wins over a preset), --local serves the model in
    # this process instead of starting Ray, --output-dir keeps the run in tmp. None of them is a flag the
    # README command sets, so every flag it does set reaches the job as written (checked below on config).
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:], "--quick", "--budget", "120", "--local",
                             "--output-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "result.json").read_text())
    config = saved["config"]
    assert (config["task"], config["template"], config["verbalizer"], config["k_shot"]) == (
        task, _flag(argv, "--template"), _flag(argv, "--verbalizer"), k)
    assert (saved["n_train"], saved["n_dev"], saved["n_test"]) == (2 * k, 2 * k, 16)
    accuracy = saved["test_accuracy"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    # 16 test rows: an accuracy is a whole number of them.
    assert round(accuracy * 16, 9) == round(accuracy * 16)
