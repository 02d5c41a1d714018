"""Connecting to Ray: a running cluster when there is one (RAY_ADDRESS, `ray job submit`), else a
local Ray started in-process. Token authentication stays on (Ray 2.60's default)."""
from __future__ import annotations

import logging
import os

__all__ = ["init_ray"]


def init_ray(num_cpus: int | None = None, dashboard: bool = False, quiet: bool = True) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs = {"logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)  # a job submitted to a cluster
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, **kwargs)
