"""--resume never unpickles a checkpoint this installation did not sign; the log matches the checkpoint."""
from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest

from tests.entry_points import run_in_process
from tests.test_bbt_job import SMALL


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _job(out, *extra):
    """jobs/bbt.py on the session's reference config (bbt_small_run's), in this process: it serves the
    model locally, and the Ray guard would fail the test if a resume reached Ray."""
    return run_in_process("jobs/bbt.py", [*SMALL, "--local", "--output-dir", str(out), *extra])


def test_crafted_pickle_is_refused_and_never_runs(bbt_small_run, tmp_path):
    ref = bbt_small_run
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(probe)))
    assert probe.exists()  # the payload does run when unpickled
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes((ref / "config.json").read_bytes())
    (run / "checkpoint.pkl").write_bytes(pickle.dumps(_Touch(marker)))
    result = _job(run, "--resume")
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr[-2000:]
    assert "was not written by this raydapt installation" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not marker.exists()


def test_flipped_byte_is_refused(bbt_small_run, tmp_path):
    import shutil

    from raydapt.errors import UserError
    from raydapt.outputs import load_checkpoint

    ref = bbt_small_run
    load_checkpoint(ref / "checkpoint")  # genuine: loads
    shutil.copytree(ref / "checkpoint", tmp_path / "checkpoint")
    state = next((tmp_path / "checkpoint").glob("state-*.safetensors"))
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(UserError, match="signature missing or wrong"):
        load_checkpoint(tmp_path / "checkpoint")


def test_resume_after_first_row_with_torn_line_equals_uninterrupted(bbt_small_run, tmp_path):
    from raydapt.outputs import read_jsonl

    ref = bbt_small_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes((ref / "config.json").read_bytes())
    first = (ref / "log.jsonl").read_text().splitlines()[0]
    (run / "log.jsonl").write_text(first + "\n" + '{"generation": 2, "ap')  # killed before any checkpoint
    assert len(read_jsonl(run / "log.jsonl")) == 1  # readers skip the torn tail
    resumed = _job(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    untimed = lambda p: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_jsonl(p)]  # noqa: E731
    assert untimed(run / "log.jsonl") == untimed(ref / "log.jsonl")
    assert (run / "best_prompt.safetensors").read_bytes() == (ref / "best_prompt.safetensors").read_bytes()


def test_optimizer_restore_unpickles_only_sealed_states(tmp_path, monkeypatch):
    from raydapt.search import make_optimizer, restore

    monkeypatch.setenv("RAYDAPT_HOME", str(tmp_path / "home"))
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="not an optimizer state sealed by this raydapt installation"):
        restore(pickle.dumps(_Touch(marker)))
    assert not marker.exists()
    opt = make_optimizer("cma", dim=4, popsize=4, budget=100, seed=0, sigma=1.0)
    sealed = opt.state_bytes()
    assert np.array_equal(restore(sealed).ask(), opt.ask())  # genuine: restores to the same next ask
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(ValueError, match="sealed by this raydapt installation"):
        restore(bytes(flipped))
    monkeypatch.setenv("RAYDAPT_HOME", str(tmp_path / "other-home"))  # another installation's key
    with pytest.raises(ValueError, match="sealed by this raydapt installation"):
        restore(sealed)


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    """The expert's AdamW state is stored without pickle: two more steps after a save and load equal
    two more steps of the optimizer that never left memory."""
    import torch

    from raydapt.models.checkpoint import load_optimizer_state, save_optimizer_state

    def step(model, opt, seed):
        torch.manual_seed(seed)
        loss = model(torch.randn(4, 5)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for seed in range(3):
        step(model, opt, seed)
    save_optimizer_state(opt.state_dict(), tmp_path / "optimizer.safetensors")
    copy = type(model)(*[type(m)(*m.weight.shape[::-1]) if isinstance(m, torch.nn.Linear) else type(m)() for m in model])
    copy.load_state_dict(model.state_dict())
    copy_opt = torch.optim.AdamW(copy.parameters(), lr=1.0)  # lr and betas come from the file
    copy_opt.load_state_dict(load_optimizer_state(tmp_path / "optimizer.safetensors"))
    for seed in (3, 4):
        step(model, opt, seed)
        step(copy, copy_opt, seed)
    for a, b in zip(model.parameters(), copy.parameters()):
        assert torch.equal(a, b)
    assert copy_opt.param_groups[0]["lr"] == 1e-2 and copy_opt.state_dict()["state"][0]["step"] == 5
