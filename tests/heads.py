"""Starting and stopping a Ray head of a test's own: `ray start --head` in a temporary directory,
with token authentication, on free ports. Stopping ends exactly the processes whose command line
names that directory (and their children): no other Ray on the machine is touched."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                ours += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for proc in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(ours, timeout=3)  # a test head need not shut down gracefully
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@contextlib.contextmanager
def ray_head(num_cpus: int = 4, extra_args: tuple = (), extra_env: dict | None = None, port: int | None = None):
    """Yields {"env", "address", "dashboard", "metrics", "temp_dir"}; the head is stopped on exit."""
    temp_dir = tempfile.mkdtemp(prefix="rdpt-head-", dir="/tmp")
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    # Every port free and our own: another Ray on this machine (the test session's, a user's) already
    # holds the defaults, e.g. the dashboard agent's 52365, and a head without its agent takes no jobs.
    ports = {"port": port or free_port(), "dashboard-port": free_port(), "metrics-export-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "runtime-env-agent-port": free_port()}
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                        "RAY_metrics_report_interval_ms": "1000", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    args = [RAY, "start", "--head", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()],
            *extra_args]
    try:
        subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=180)
        yield {"env": env, "address": f"127.0.0.1:{ports['port']}", "port": ports["port"],
               "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}",
               "metrics": f"http://127.0.0.1:{ports['metrics-export-port']}/metrics", "temp_dir": temp_dir}
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
