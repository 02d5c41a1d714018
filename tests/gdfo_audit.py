"""Run by tests/test_gdfo_job.py: a GDFO run on Ray (teacher in 2 stage actors, student in its own
actor), then an audit of which arrays the coordinator (this process) and the student's process
hold. A teacher weight has a 2-D shape from the teacher's checkpoint; none may appear outside the
stages, neither as a torch tensor nor as a numpy array (what the stages hand back is numpy)."""
import gc
import json
import sys
import warnings

import numpy as np
import torch
from safetensors import safe_open

from actors.runner import RayRuntime
from actors.student import RayStudent
from raydapt.config import parse_args
from raydapt.defaults import default_model_dir
from raydapt.gdfo.config import QUICK, GDFOConfig
from raydapt.gdfo.job import run_gdfo_job
from raydapt.gdfo.worker import StudentWorker


def held_shapes() -> dict:
    """Shapes of every torch tensor and numpy array this process holds (as far as the garbage
    collector sees: numpy arrays are not GC-tracked, so they are found as the referents of the
    containers and objects that are, and as the bases of views)."""
    gc.collect()
    tracked = gc.get_objects()
    warnings.simplefilter("ignore", FutureWarning)  # isinstance() on deprecated torch module attributes
    tensors = {tuple(t.shape) for t in tracked if isinstance(t, torch.Tensor)}
    arrays, seen = set(), set()
    for obj in tracked:
        for ref in gc.get_referents(obj):
            while isinstance(ref, np.ndarray) and id(ref) not in seen:
                seen.add(id(ref))
                arrays.add(tuple(ref.shape))
                ref = ref.base
    return {"torch": sorted(tensors), "numpy": sorted(arrays), "n_numpy": len(seen)}


class AuditedStudent(StudentWorker):
    """The real student, reporting what its whole process holds instead of its own weights' shapes.
    Defined in __main__, so Ray ships it by value to the student's process."""

    def tensor_shapes(self) -> dict:
        import os
        return {"pid": os.getpid(), "held": held_shapes()}


def teacher_weight_shapes() -> set:
    with safe_open(default_model_dir("large") / "model.safetensors", framework="pt") as f:
        shapes = {tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {s for s in shapes if len(s) == 2}


if __name__ == "__main__":
    out = sys.argv[1]
    cfg = parse_args(GDFOConfig, ["--quick", "--budget", "60", "--dev-every", "30", "--stages", "2",
                                  "--baseline", "none", "--output-dir", out], presets={"quick": QUICK})
    teacher = teacher_weight_shapes()
    # A control: the scan must find a numpy array of a teacher shape when this process holds one.
    probe = [np.zeros(sorted(teacher)[0], np.float32)]
    control = tuple(probe[0].shape) in held_shapes()["numpy"]
    del probe
    result = run_gdfo_job(cfg, RayRuntime(), lambda *args: RayStudent(*args, worker_cls=AuditedStudent))
    here, student = held_shapes(), result["student_process"]["held"]
    print(json.dumps({
        "teacher_shapes": sorted(teacher), "control_found": control,
        "coordinator": sorted(set(map(tuple, here["torch"] + here["numpy"])) & teacher),
        "student": sorted(set(map(tuple, student["torch"] + student["numpy"])) & teacher),
        "coordinator_numpy_arrays": here["n_numpy"], "student_numpy_arrays": student["n_numpy"],
        "student_pid": result["student_process"]["pid"], "api_calls": result["api_calls"]}))
