"""A real Ray head with token authentication, started in a temporary directory: `ray job submit`
of jobs/gdfo.py --quick succeeds with the token, is refused without it (HTTP 401) and with a wrong
one (403), and the head's metrics endpoint carries the raydapt_* metrics of the run. The head is
stopped at the end, even on failure, by ending exactly the processes whose command line names this
test's temporary directory: no other Ray on the machine is touched."""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.heads import RAY, ray_head

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def head():
    with ray_head() as h:
        yield h


def scrape(url: str) -> dict[str, float]:
    """{metric name with labels: value} for the raydapt_* series."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if "raydapt_" in line and not line.startswith("#")}


def job_status(dashboard: str, job_id: str, token: str) -> str:
    request = urllib.request.Request(f"{dashboard}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())["status"]


@pytest.mark.cluster
@pytest.mark.slow
def test_submit_gdfo_with_token_auth(head, tmp_path):
    out = tmp_path / "gdfo"
    submit = [RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", str(ROOT), "--no-wait",
              "--", "python", "jobs/gdfo.py", "--quick", "--seed", "7", "--budget", "120", "--dev-every", "40",
              "--output-dir", str(out)]
    # Without the token: the jobs API answers 401 before anything runs.
    request = urllib.request.Request(f"{head['dashboard']}/api/jobs/", method="POST",
                                     data=json.dumps({"entrypoint": "python jobs/gdfo.py --quick"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:  # and a wrong token: 403
        job_status(head["dashboard"], "raysubmit_x", "0" * 64)
    assert wrong.value.code == 403
    # With it: submitted through the CLI, followed until it ends, metrics scraped meanwhile.
    started = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", started.stdout).group(0)  # the CLI colours its output
    # Followed through the jobs API with the token (a `ray job status` process every 2 s would cost
    # ~1.5 s of CPU each, a third of this test's time on 2 cores).
    token = Path(head["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    status, seen = "", {}
    deadline = time.time() + 600
    while time.time() < deadline:
        seen |= scrape(head["metrics"])
        status = job_status(head["dashboard"], job_id, token)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = subprocess.run([RAY, "job", "logs", "--address", head["dashboard"], job_id], env=head["env"],
                          capture_output=True, text=True).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    seen |= scrape(head["metrics"])
    results = {m: json.loads((out / m / "result.json").read_text()) for m in ("bbt", "gdfo")}
    assert all(r["api_calls"] > 0 and r["test_accuracy"] >= 0 for r in results.values())
    names = {key.split("{")[0] for key in seen}
    print(sorted(names))
    for name in ("oracle_calls_total", "oracle_examples_total", "oracle_tokens_total", "stage_calls_total",
                 "stage_rows_total", "stage_forward_seconds_bucket", "api_calls_used", "api_budget_left",
                 "best_train_loss", "generation", "student_agreement"):
        assert f"ray_raydapt_{name}" in names, (name, sorted(names))
    # GDFO and its BBT baseline write one series each, tagged by method and run.
    used = {k: v for k, v in seen.items() if k.startswith("ray_raydapt_api_calls_used{")}
    for method, r in results.items():
        series = [v for k, v in used.items() if f'method="{method}"' in k and f'run="gdfo/{method}"' in k]
        logged = [row["api_calls"] for row in map(json.loads, (out / method / "log.jsonl").read_text().splitlines())]
        # A value this run logged, past its first: the series moved while the run ran. Not its last: the
        # head exports metrics every few seconds, and on a loaded machine the last scrape lags behind.
        assert len(series) == 1 and series[0] in logged and series[0] > min(logged), (method, used)
