"""Running an entry point (jobs/*.py, `python -m actors.cli`) the way the tests need: as a real
subprocess (`run_entry_point`), or in this process with Ray guarded (`run_in_process`), for bad
input, which must be refused before Ray or any actor starts; and `assert_one_line_error`, what such
a refusal must look like. tests/test_cli_errors.py tests the guard itself."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Where Ray would connect if a script run in a subprocess started it: a port nothing listens on, so
# a check made after Ray starts hangs (ray.init waits for a GCS there) instead of passing.
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:9"}


def run_entry_point(entry, argv: list[str], timeout: float = 120, env: dict | None = None
                    ) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, *(entry if isinstance(entry, list) else [str(ROOT / entry)]), *argv]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env=os.environ | (env or {}))
    return result, time.perf_counter() - started


# --- Entry points in this process ---------------------------------------------------------------

class RayStartedError(BaseException):
    """Raised by the guard. A BaseException, so no `except Exception` on the way swallows it."""


_MODULES: dict = {}  # script path -> its module, loaded once
_LIBRARIES = ("numpy", "torch", "transformers", "datasets", "ray", "ray.actor", "ray.remote_function",
              "ray.util.placement_group")
_ENTRY_FUNCTION = {"suite.py": "suite"}  # scripts whose command function is not named main


def _entry_function(entry):
    """(the command function, the argv words the entry itself carries, the script's path)."""
    if isinstance(entry, list):  # ["-m", "actors.cli", "score", ...], as on a command line
        assert entry[0] == "-m", entry
        module = importlib.import_module(entry[1])
        return module.main, list(entry[2:]), module.__file__
    path = (ROOT / entry).resolve()
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"entry_point_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return getattr(_MODULES[path], _ENTRY_FUNCTION.get(path.name, "main")), [], str(path)


def _guard_ray(mp: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Make starting Ray, or anything on a Ray cluster already up, raise RayStartedError.

    ray.init covers a cluster started or joined (jobs call it through actors.cluster.init_ray; Ray's
    auto-init on ray.get/put calls it too). When this pytest session already has a cluster up
    (tests/conftest.py's ray_cluster), init_ray skips ray.init, so what runs on the cluster is guarded
    too: every actor (stage pools, the GDFO student, Ray Train's controller and workers: TorchTrainer
    .fit creates them through ActorClass._remote), every task, placement groups and object puts.
    """
    import ray
    import ray._private.worker
    import ray.actor
    import ray.remote_function

    placement_groups = sys.modules["ray.util.placement_group"]  # ray.util.placement_group: the function

    def refuse(what):
        def refused(*args, **kwargs):
            calls.append(what)
            raise RayStartedError(f"{what} called: this entry point reached Ray before refusing its bad input")
        return refused

    for target, name in [(ray, "init"), (ray._private.worker, "init"), (ray, "put"),
                         (ray.actor.ActorClass, "_remote"), (ray.remote_function.RemoteFunction, "_remote"),
                         (placement_groups, "placement_group")]:
        mp.setattr(target, name, refuse(f"{getattr(target, '__name__', target)}.{name}"))


@contextlib.contextmanager
def _as_a_process_prints(out: io.StringIO, err: io.StringIO, main_module: str):
    """stdout and stderr into `out` and `err`, with warnings and log records printed there as a fresh
    interpreter prints them, not recorded by pytest: so "one line on stderr" means the same here.
    `main_module` is the script's module, __main__ in a real run."""
    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    handlers = [h for logger in [logging.root, *logging.root.manager.loggerDict.values()]
                for h in getattr(logger, "handlers", ()) if type(h) is logging.StreamHandler]
    streams = [h.stream for h in handlers]
    root_handlers = logging.root.handlers[:]
    with warnings.catch_warnings():
        # pytest's own filters show every warning (DeprecationWarning included) to record it; keep the
        # "ignore" ones (Python's defaults, those the libraries added) and show the rest as Python does.
        kept = [f for f in warnings.filters if f[0] == "ignore"]
        warnings.resetwarnings()
        warnings.filters[:] = kept
        warnings.simplefilter("default", append=True)
        warnings.filterwarnings("default", category=DeprecationWarning, module=re.escape(main_module))  # as __main__
        warnings.showwarning = show
        try:
            # pytest's log capture off the root logger: an unhandled WARNING reaches logging.lastResort,
            # which prints to sys.stderr; library handlers (transformers') print where the process would.
            logging.root.handlers[:] = [h for h in root_handlers if type(h) is logging.StreamHandler]
            for h in handlers:
                h.setStream(out if h.stream in (sys.stdout, sys.__stdout__) else err)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            logging.root.handlers[:] = root_handlers
            for h, stream in zip(handlers, streams):
                h.setStream(stream)


@contextlib.contextmanager
def _process_state_restored():
    """Leave this process as it was: what an entry point sets for its own run (torch threads, seeds,
    environment, logging levels, progress bars, cwd, sys.path) must not reach later tests. (What
    the libraries set up when first imported is imported before, in run_in_process, and kept.)"""
    import numpy as np
    import torch

    environ = dict(os.environ)
    cwd, path = os.getcwd(), sys.path[:]
    torch_state = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   torch.get_default_dtype(), torch.is_grad_enabled())
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    levels = {name: (logger.level, logger.disabled, logger.propagate)
              for name, logger in [("", logging.root), *logging.root.manager.loggerDict.items()]
              if isinstance(logger, logging.Logger)}
    disable = logging.root.manager.disable
    progress = {module: importlib.import_module(module).is_progress_bar_enabled()  # the jobs import both
                for module in ("transformers.utils.logging", "datasets.utils.logging")}
    try:
        yield
    finally:
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        os.chdir(cwd)
        sys.path[:] = path
        threads, deterministic, dtype, grad = torch_state
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        for name, (level, disabled, propagate) in levels.items():
            logger = logging.getLogger(name or None)
            logger.setLevel(level)
            logger.disabled, logger.propagate = disabled, propagate
        logging.disable(disable)
        for module, enabled in progress.items():
            utils = importlib.import_module(module)
            utils.enable_progress_bar() if enabled else utils.disable_progress_bar()


def run_in_process(entry, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry point's command function in this process, as `python ENTRY ARGV...` would from
    the repository root, and return what it printed and its exit status.

    `entry` is a script path under the repository ("jobs/bbt.py") or `["-m", "actors.cli", ...]`. The
    script is loaded once; its `main(argv)` is called with Ray guarded (`_guard_ray`: starting Ray,
    an actor, a task or a placement group raises, and the test fails even if the entry point swallowed
    the error). SystemExit gives the returncode, a normal return 0; any other exception propagates
    with its traceback. Whatever the run changes in this process is put back afterwards.
    """
    function, words, script = _entry_function(entry)
    for module in _LIBRARIES:  # imported (and set up) before the state to restore is read
        importlib.import_module(module)
    argv = [*words, *map(str, argv)]
    out, err = io.StringIO(), io.StringIO()
    calls: list[str] = []
    with _process_state_restored(), pytest.MonkeyPatch.context() as mp:
        _guard_ray(mp, calls)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        mp.chdir(ROOT)
        mp.setattr(sys, "argv", [script, *argv])
        with _as_a_process_prints(out, err, function.__module__):
            started = time.perf_counter()
            try:
                function(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)  # as the interpreter does with sys.exit("text")
            seconds = time.perf_counter() - started
    assert not calls, f"{calls[0]} called (then handled?): {entry} {argv} reached Ray before refusing its input"
    result = subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())
    result.seconds = seconds  # the command function's own time: loading the script is not counted
    return result


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
