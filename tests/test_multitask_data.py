"""The shipped multi-task set (raydapt/assets/tasks/multitask), its loader and encoder, and its recipe."""
from __future__ import annotations

import json

import numpy as np
import pytest

from raydapt.data.multitask import (IGNORE, SPLITS, EncodedMulti, MultiTask, default_multitask_dir, encode_multitask,
                                    exact_match, load_multitask)
from raydapt.defaults import assets_dir
from raydapt.errors import UserError

MAX_TOKENS = 96


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets_dir() / "models" / "large")


@pytest.fixture(scope="module")
def multi():
    return load_multitask()


@pytest.fixture(autouse=True)
def shipped_models(tmp_path, monkeypatch):
    """The recipe's default tokenizer is the shipped one, whatever $RAYDAPT_HOME holds on this machine."""
    monkeypatch.setenv("RAYDAPT_HOME", str(tmp_path / "home"))


def test_shipped_set_has_four_tasks_of_two_kinds_and_the_stated_counts(multi):
    meta = json.loads((default_multitask_dir() / "tasks.json").read_text())
    assert multi.names == [t["name"] for t in meta["tasks"]]
    assert len(multi.names) >= 4 and len(set(multi.kinds)) >= 2
    assert set(multi.kinds) <= {"classification", "generation"}
    assert all(t.count("{source}") == 1 for t in multi.templates)
    for entry in meta["tasks"]:
        for split in SPLITS:
            rows = [r for r in getattr(multi, split) if r["task"] == entry["name"]]
            assert len(rows) == entry["counts"][split] > 0
    assert sum(f.stat().st_size for f in default_multitask_dir().iterdir()) < 1_000_000


def test_splits_are_disjoint_per_task(multi):
    for name in multi.names:
        sources = {split: [r["source"] for r in getattr(multi, split) if r["task"] == name] for split in SPLITS}
        for split, found in sources.items():
            assert len(set(found)) == len(found), (name, split)
        assert not set(sources["train"]) & set(sources["dev"])
        assert not set(sources["train"]) & set(sources["test"])
        assert not set(sources["dev"]) & set(sources["test"])


def test_classification_targets_are_the_label_words(multi, tokenizer):
    meta = {t["name"]: t for t in json.loads((default_multitask_dir() / "tasks.json").read_text())["tasks"]}
    for name, kind in zip(multi.names, multi.kinds):
        targets = {r["target"] for split in SPLITS for r in getattr(multi, split) if r["task"] == name}
        if kind == "classification":
            assert targets == set(meta[name]["labels"])
            assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in targets)
        else:
            assert len(targets) > 3  # a generation task, not a few classes


def test_encoded_rows_fit_and_label_exactly_the_target_and_end(multi, tokenizer):
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    for split in SPLITS:
        rows = getattr(multi, split)
        enc = encode_multitask(tokenizer, multi, rows)
        N, T = enc.input_ids.shape
        assert enc.labels.shape == (N, T) and enc.input_ids.dtype == enc.labels.dtype == np.int64
        assert int(enc.lengths.max()) <= MAX_TOKENS
        for i, row in enumerate(rows):
            t = multi.names.index(row["task"])
            start, length = int(enc.target_start[i]), int(enc.lengths[i])
            assert enc.task[i] == t
            prompt = multi.templates[t].replace("{source}", row["source"])
            assert tokenizer.decode(enc.input_ids[i, :start]) == prompt
            assert tokenizer.decode(enc.input_ids[i, start: length - 1]) == row["target"]
            assert enc.input_ids[i, length - 1] == newline[0]
            labelled = np.flatnonzero(enc.labels[i] != IGNORE)
            assert labelled.tolist() == list(range(start, length))
            assert tokenizer.decode(enc.labels[i, labelled]) == row["target"] + "\n"
            assert (enc.labels[i, labelled] == enc.input_ids[i, labelled]).all()
            assert (enc.input_ids[i, length:] == tokenizer.pad_token_id).all()


def test_exact_match_checks_every_target_token_and_the_end(multi, tokenizer):
    rows = [r for r in multi.test if r["task"] == multi.names[-1]][:4]
    enc = encode_multitask(tokenizer, multi, rows)
    perfect = np.roll(enc.input_ids, -1, axis=1)  # the argmax at p is the token at p + 1
    assert exact_match(perfect, enc).all()
    wrong_target, wrong_end = perfect.copy(), perfect.copy()
    wrong_target[0, enc.target_start[0] - 1] += 1
    wrong_end[1, enc.lengths[1] - 2] += 1
    assert exact_match(wrong_target, enc).tolist() == [False, True, True, True]
    assert exact_match(wrong_end, enc).tolist() == [True, False, True, True]
    assert exact_match(wrong_end, enc, end=False).all()
    elsewhere = perfect.copy()
    elsewhere[:, 0] += 1  # a prompt position: not scored
    assert exact_match(elsewhere, enc).all()


def test_load_and_encode_errors_name_the_problem(tmp_path, multi, tokenizer):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"{missing} does not exist"):
        load_multitask(missing)
    with pytest.raises(UserError, match=f"{tmp_path} is not a multi-task directory"):
        load_multitask(tmp_path)
    (tmp_path / "tasks.json").write_text(json.dumps(
        {"tasks": [{"name": "a", "kind": "generation", "template": "{source} ="}]}))
    with pytest.raises(UserError, match="train.jsonl is missing"):
        load_multitask(tmp_path)
    for split in SPLITS:
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"task": "a", "source": "x", "target": " y"}) + "\n")
    assert load_multitask(tmp_path).train == [{"task": "a", "source": "x", "target": " y"}]
    (tmp_path / "dev.jsonl").write_text(json.dumps({"task": "b", "source": "x", "target": " y"}) + "\n")
    with pytest.raises(UserError, match=r"dev.jsonl: unknown task\(s\) \['b'\]"):
        load_multitask(tmp_path)
    (tmp_path / "tasks.json").write_text(json.dumps(
        {"tasks": [{"name": "a", "kind": "regression", "template": "{source}"}]}))
    with pytest.raises(UserError, match="kind 'regression'; accepted"):
        load_multitask(tmp_path)
    with pytest.raises(UserError, match="unknown task 'nope'"):
        encode_multitask(tokenizer, multi, [{"task": "nope", "source": "x", "target": " y"}])
    with pytest.raises(UserError, match="end token 'zq\\\\nzq' is .* must be exactly one token"):
        encode_multitask(tokenizer, multi, multi.test[:2], end_token="zq\nzq")


def test_function_examples_of_a_small_file():
    from raydapt.data.make_multitask import function_examples

    source = ("import os\nimport sys as system\n\n\ndef join_all(parts):\n    \"\"\"Join.\"\"\"\n"
              "    return os.path.join(*parts)\n\n\ndef test_it(self):\n    self.check(len(system.argv))\n\n\n"
              "def one(): return 1\n\n\nx = dict(a=[1, (2, f(3))])\ny = g(4)\nz = h([5])  # note\n")
    found = function_examples(source)
    body = '"""Join."""\nreturn os.path.join(*parts)'
    assert found["function_name"] == [(body, " join_all")]  # test* methods and one-line defs left out
    assert found["module"] == [(body, " os")]  # `sys as system` is not a plain import
    # Two or more brackets cut from one-line statements, anywhere (a test body too); not before a comment
    assert sorted(found["closing_brackets"]) == [("self.check(len(system.argv", "))"), ("x = dict(a=[1, (2, f(3", "))])")]
    assert function_examples("def broken(:\n") == {"function_name": [], "module": [], "closing_brackets": []}


def test_recipe_reproduces_every_shipped_file(tmp_path):
    """The recipe on this machine's stdlib (~10 s) writes the shipped files byte for byte."""
    from raydapt.data.make_multitask import MakeMultitaskConfig, make_multitask

    out = make_multitask(MakeMultitaskConfig(output_dir=str(tmp_path / "mt")))
    for name in ("tasks.json",) + tuple(f"{s}.jsonl" for s in SPLITS):
        assert (out / name).read_bytes() == (default_multitask_dir() / name).read_bytes(), name


def test_recipe_can_make_one_task_alone(tmp_path):
    """Each task draws with its own generator: made alone, its rows are the shipped ones."""
    from raydapt.data.make_multitask import MakeMultitaskConfig, make_multitask

    with pytest.raises(UserError, match=r"unknown task\(s\) \['nope'\]"):
        make_multitask(MakeMultitaskConfig(output_dir=str(tmp_path / "x")), names=["nope"])
    out = make_multitask(MakeMultitaskConfig(output_dir=str(tmp_path / "mt")), names=["exception"])
    for split in SPLITS:
        lines = (default_multitask_dir() / f"{split}.jsonl").read_text().splitlines(keepends=True)
        assert (out / f"{split}.jsonl").read_text() == "".join(
            line for line in lines if json.loads(line)["task"] == "exception")
    shipped = json.loads((default_multitask_dir() / "tasks.json").read_text())["tasks"]
    assert json.loads((out / "tasks.json").read_text())["tasks"] == [t for t in shipped if t["name"] == "exception"]


def test_multitask_dataclasses_have_the_agreed_fields():
    assert {"names", "kinds", "templates", "train", "dev", "test"} <= set(MultiTask.__dataclass_fields__)
    assert list(EncodedMulti.__dataclass_fields__) == ["task", "input_ids", "lengths", "labels", "target_start"]
    assert IGNORE == -100
