"""Run by tests/test_gdfo_job.py: a GDFO run on Ray (teacher in 2 stage actors, student in its own
actor), then an audit of which tensors the coordinator (this process) and the student hold. A
teacher weight has a 2-D shape from the teacher's checkpoint; none may appear outside the stages."""
import gc
import json
import sys

import torch
from safetensors import safe_open

from raydapt.config import parse_args
from raydapt.defaults import default_model_dir
from raydapt.gdfo.config import QUICK, GDFOConfig
from raydapt.gdfo.job import run_gdfo_job

out = sys.argv[1]
cfg = parse_args(GDFOConfig, ["--quick", "--budget", "60", "--dev-every", "30", "--stages", "2", "--baseline", "none",
                              "--output-dir", out], presets={"quick": QUICK})
teacher = default_model_dir("large") / "model.safetensors"
with safe_open(teacher, framework="pt") as f:
    teacher_shapes = {tuple(f.get_slice(k).get_shape()) for k in f.keys()}
teacher_shapes = {s for s in teacher_shapes if len(s) == 2}

result = run_gdfo_job(cfg)
held_here = {tuple(t.shape) for t in gc.get_objects() if isinstance(t, torch.Tensor)}
held_by_student = {tuple(s) for s in result["student_process"]["shapes"]}
print(json.dumps({"teacher_shapes": sorted(teacher_shapes), "coordinator": sorted(held_here & teacher_shapes),
                  "student": sorted(held_by_student & teacher_shapes), "student_pid": result["student_process"]["pid"],
                  "api_calls": result["api_calls"]}))
