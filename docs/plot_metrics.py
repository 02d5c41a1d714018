"""Plot the raydapt_* metrics of one GDFO run as a metrics endpoint serves them (what Prometheus
scrapes and the dashboard's Grafana panels chart): writes docs/metrics.png.

    python docs/plot_metrics.py [--output docs/metrics.png] [--port 8089]

It starts a local Ray that exports metrics on --port, runs `jobs/gdfo.py --quick` in a thread and
scrapes http://127.0.0.1:PORT/metrics every second until the run ends.
"""
from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

SERIES = {  # panel title: metric names (Ray prefixes each with ray_)
    "API calls used / left": ("raydapt_api_calls_used", "raydapt_api_budget_left"),
    "best train loss": ("raydapt_best_train_loss",),
    "dev accuracy (best so far)": ("raydapt_best_dev_accuracy",),
    "student agreement (Spearman rho)": ("raydapt_student_agreement",),
    "oracle tokens served (all stages)": ("raydapt_stage_tokens_total",),
    "generation": ("raydapt_generation",),
}


def scrape(url: str) -> dict[str, float]:
    """{metric name (no labels): value summed over its label sets} of the raydapt_* series."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if "raydapt_" in line and not line.startswith("#"):
            name = re.sub(r"^ray_", "", line.split("{")[0].split(" ")[0])
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])  # summed over stages
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("metrics.png"))
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()

    import ray
    from actors.runner import RayRuntime
    from raydapt.config import parse_args
    from raydapt.gdfo.config import QUICK, GDFOConfig
    from raydapt.gdfo.job import run_gdfo_job

    temp_dir = tempfile.mkdtemp(prefix="rdpt-metrics-", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=args.port,
             logging_level="ERROR", _temp_dir=temp_dir)
    out = Path(tempfile.mkdtemp(prefix="gdfo-metrics-"))
    cfg = parse_args(GDFOConfig, ["--quick", "--seed", "7", "--baseline", "none", "--output-dir", str(out / "run")],
                     presets={"quick": QUICK})
    run = threading.Thread(target=run_gdfo_job, args=(cfg, RayRuntime()))
    t0, samples = time.time(), []
    run.start()
    while run.is_alive():
        samples.append((time.time() - t0, scrape(f"http://127.0.0.1:{args.port}/metrics")))
        time.sleep(1.0)
    time.sleep(6)  # the metrics agent reports every few seconds: take the final values too
    samples.append((time.time() - t0, scrape(f"http://127.0.0.1:{args.port}/metrics")))
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    plot(samples, args.output)
    print(f"wrote {args.output} from {len(samples)} scrapes")


def plot(samples: list[tuple[float, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, names) in zip(axes.ravel(), SERIES.items()):
        for name in names:
            points = [(t, v[name]) for t, v in samples if name in v]
            if points:
                ax.plot(*zip(*points), label=name.removeprefix("raydapt_"))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        if len(names) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("raydapt_* metrics scraped from the metrics endpoint during jobs/gdfo.py --quick --seed 7")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
