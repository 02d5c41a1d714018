"""The GDFO student as a Ray actor, so that it learns and descends while the stages score.

`GDFOSearch` takes a `start_student(*worker_args)` callable; `actors.runner`'s runtimes hand it the
in-process one (`--local`) or this one.
"""
from __future__ import annotations

import ray

from raydapt.gdfo.worker import StudentWorker

__all__ = ["RayStudent"]


class RayStudent:
    """A `StudentWorker` (or a subclass, for audits) in its own actor, with one CPU."""

    def __init__(self, *worker_args, worker_cls=StudentWorker):
        self._actor = ray.remote(worker_cls).options(num_cpus=1).remote(*worker_args)

    def submit(self, method: str, *args) -> "_Pending":
        return _Pending(getattr(self._actor, method).remote(*args))


class _Pending:
    """An actor call's result; `ray.get` re-raises the actor's own exception type (a UserError too)."""

    def __init__(self, ref):
        self._ref = ref

    def result(self):
        return ray.get(self._ref)

