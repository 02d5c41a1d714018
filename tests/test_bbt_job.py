"""jobs/bbt.py end to end: invariance across replicas x stages, SIGKILL + --resume, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.entry_points import assert_one_line_error, run_in_process

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "bbt.py")]
# Smaller than --quick: these tests check mechanics, not quality.
SMALL = ["--quick", "--seed", "7", "--budget", "120", "--dev-every", "40"]
METRICS = ("api_calls", "generations", "best_train_loss", "dev_accuracy", "test_accuracy", "test_f1",
           "manual_prompt_test_accuracy", "oracle_usage")


def run_job(*args, timeout=600):
    result = subprocess.run([*JOB, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out: Path) -> dict:
    result = json.loads((out / "result.json").read_text())
    return {k: result[k] for k in METRICS}


@pytest.mark.cluster
@pytest.mark.slow
def test_same_result_on_2x2_with_a_stage_killed_as_in_one_process(bbt_small_run, tmp_path):
    """R x S = 2 x 2 on Ray actors, one stage actor SIGKILLed mid-run, equals the in-process 1 x 1 run."""
    one, four = bbt_small_run, tmp_path / "r2s2"
    run_job(*SMALL, "--replicas", 2, "--stages", 2, "--fault-injection", "kill-stage:after-calls=3,stage=1",
            "--output-dir", four)
    assert (one / "best_prompt.safetensors").read_bytes() == (four / "best_prompt.safetensors").read_bytes()
    assert metrics(one) == metrics(four)
    report = json.loads((four / "result.json").read_text())["fault_tolerance"]
    assert report["injected"] and report["stage_restarts"] == 1
    for name in ("log.jsonl", "curve.png", "config.json", "checkpoint/index.json"):
        assert (one / name).exists() and (four / name).exists()


def kill_mid_run(cmd: list, out: Path, rows: int = 4) -> list[str]:
    """Start a job, SIGKILL it once its log has `rows` rows; return the log lines it left."""
    proc = subprocess.Popen([*cmd, "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < rows):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # only the job we started, and its children
    proc.wait()
    assert not (out / "result.json").exists(), "the job finished before it was killed"
    return log.read_text().splitlines()


# Every field --resume accepts changed at once, between the killed leg (in process, 1 x 1) and the
# resumed one: the directory moves, and the rest runs on Ray actors, 2 x 2, with other resources,
# placement and logging, and a stage killed.
RESUME_CHANGES = ["--replicas", "2", "--stages", "2", "--cpus-per-stage", "2", "--placement", "SPREAD",
                  "--log-every", "1", "--fault-injection", "kill-stage:after-calls=2,stage=1"]


def check_resume_changes(saved_config: Path, result: dict, neutral: tuple) -> None:
    """The resumed run differed from the killed one in every result-neutral field, and only there."""
    saved, now = json.loads(saved_config.read_text()), result["config"]
    changed = {k for k in now if saved.get(k) != now[k]}
    assert changed == set(neutral), (changed ^ set(neutral))


@pytest.mark.cluster
@pytest.mark.slow
def test_killed_and_resumed_with_every_neutral_field_changed_equals_uninterrupted(bbt_small_run, tmp_path):
    from raydapt.bbt.config import RESULT_NEUTRAL_FIELDS

    whole, killed, moved = bbt_small_run, tmp_path / "killed", tmp_path / "moved"
    before = kill_mid_run([*JOB, *SMALL, "--local"], killed)
    killed.rename(moved)
    resumed = run_job(*SMALL, *RESUME_CHANGES, "--output-dir", moved, "--resume")
    check_resume_changes(moved / "config.json", json.loads((moved / "result.json").read_text()), RESULT_NEUTRAL_FIELDS)
    assert (whole / "best_prompt.safetensors").read_bytes() == (moved / "best_prompt.safetensors").read_bytes()
    assert metrics(whole) == metrics(moved)
    after, reference = ((d / "log.jsonl").read_text().splitlines() for d in (moved, whole))
    assert len(after) == len(reference)
    # A continuation, not a restart: rows checkpointed before the kill are kept as they were.
    kept = len(after) - sum(line.startswith("gen ") for line in resumed.stdout.splitlines())
    assert 1 <= kept <= len(before) and after[:kept] == before[:kept]
    untimed = lambda line: {k: v for k, v in json.loads(line).items() if not k.endswith("_s")}  # noqa: E731
    assert [untimed(r) for r in after] == [untimed(r) for r in reference]
    report = json.loads((moved / "result.json").read_text())["fault_tolerance"]
    assert report["injected"] and report["stage_restarts"] == 1


def run_job_in_process(*args):
    """jobs/bbt.py's main in this process, Ray guarded (tests/entry_points.py's run_in_process):
    for bad input, which is refused before any model loads. test_cli_errors runs the script itself."""
    return run_in_process("jobs/bbt.py", list(args))


@pytest.mark.parametrize("args, fragments", [
    (["--optimizer", "Nonsense"], ["--optimizer", "Nonsense"]),
    (["--popsize", "1"], ["--popsize", ">= 2"]),
    (["--budget", "5", "--popsize", "10"], ["--budget", "smaller than one population"]),
    (["--intrinsic-dim", "0"], ["--intrinsic-dim", ">= 1"]),
])
def test_bad_flags(tmp_path, args, fragments):
    result = run_job_in_process("--quick", "--local", "--output-dir", tmp_path / "o", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "o").exists()


def test_bad_task_files(tmp_path):
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("text,category\nhello,0\n")
    result = run_job_in_process("--quick", "--local", "--task", no_label, "--verbalizer", " a, b",
                                "--output-dir", tmp_path / "o")
    assert_one_line_error(result, "label")
    good = tmp_path / "task.jsonl"
    good.write_text("".join(json.dumps({"text": f"line {i}", "label": i % 2}) + "\n" for i in range(40)))
    result = run_job_in_process("--quick", "--local", "--task", good, "--verbalizer", " email, xyzzyplugh",
                                "--output-dir", tmp_path / "o")
    assert_one_line_error(result, "xyzzyplugh", "exactly one token")


def test_resume_with_a_different_config_is_refused(tmp_path):
    from raydapt.bbt.config import QUICK, BBTConfig
    from raydapt.config import parse_args, to_dict

    out = tmp_path / "o"
    out.mkdir()
    saved = to_dict(parse_args(BBTConfig, ["--quick", "--local", "--output-dir", str(out)], presets={"quick": QUICK}))
    (out / "config.json").write_text(json.dumps(saved | {"popsize": 99}))
    result = run_job_in_process("--quick", "--local", "--output-dir", out, "--resume")
    assert_one_line_error(result, "--resume", "different config", "popsize")


def test_classify_applies_the_learned_prompt_with_the_jobs_test_accuracy(bbt_small_run, tmp_path):
    """`raydapt classify` on a finished run's own test set gives exactly its test accuracy, from
    best_prompt.safetensors alone (model, template, words and mode are in its header)."""
    import pyarrow.parquet as pq

    from raydapt.bbt.config import BBTConfig
    from raydapt.bbt.inputs import load_configured_task
    run = bbt_small_run
    result = json.loads((run / "result.json").read_text())
    test = load_configured_task(BBTConfig(**{k: v for k, v in result["config"].items() if k != "resume"})).test
    names = [entry["name"] for entry in result["test_report"]["labels"]]
    lines = tmp_path / "test.jsonl"
    lines.write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n" for t, y in zip(test["text"], test["label"])))
    out = tmp_path / "predicted.parquet"
    done = subprocess.run([sys.executable, "-m", "actors.cli", "classify", "--local", "--run", str(run),
                           "--input", str(lines), "--output", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == len(test) and summary["accuracy"] == result["test_accuracy"]
    table = pq.read_table(out).to_pydict()
    assert set(table["predicted"]) <= set(names) and len(table["predicted_class"]) == len(test)
    matrix = result["test_report"]["confusion_matrix"]  # its column sums: how often each class was predicted
    assert [table["predicted_class"].count(k) for k in range(len(names))] == [sum(col) for col in zip(*matrix)]
