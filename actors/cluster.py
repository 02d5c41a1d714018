"""Connecting to Ray: the cluster RAY_ADDRESS names (`ray job submit` sets it; `RAY_ADDRESS=auto`
picks the latest `ray start` on this machine), else a new local Ray started in-process. Token
authentication stays on (Ray 2.60's default)."""
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
        # "local": never join whatever cluster this machine started last (ray.init's default without
        # an address), which is someone else's, sized for something else, and refuses num_cpus.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, **kwargs)
