"""Task files, few-shot sampling, encoding and label words, on a tiny tokenizer trained here."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydapt.data.corpus import HELD_OUT_PERCENT, discover_files, is_held_out
from raydapt.data.tasks import check_label_ids, encode_examples, few_shot, label_token_ids, load_task_file
from raydapt.errors import UserError
from raydapt.pretrain import EOS, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    text = "def hello(world):\n    return world + 1\nimport email\nimport socket\n"
    return train_tokenizer([text] * 50, vocab_size=300, context=64)


def test_load_csv_exact(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label,extra\n"a, b",1,x\nc d,0,y\n')
    data = load_task_file(path)
    assert data.column_names == ["text", "label"]
    assert data.to_dict() == {"text": ["a, b", "c d"], "label": [1, 0]}


def test_load_jsonl_string_labels_sorted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"s": "x", "y": "pos"}, {"s": "z", "y": "neg"}, {"s": "w", "y": "pos"}]))
    data = load_task_file(path, text_column="s", label_column="y")
    assert data.to_dict() == {"text": ["x", "z", "w"], "label": [1, 0, 1]}
    assert data.features["label"].names == ["neg", "pos"]


def test_load_parquet_and_json(tmp_path):
    pq.write_table(pa.table({"text": ["p", "q"], "label": [2, 0]}), tmp_path / "t.parquet")
    assert load_task_file(tmp_path / "t.parquet").to_dict() == {"text": ["p", "q"], "label": [2, 0]}
    (tmp_path / "t.json").write_text(json.dumps([{"text": 7, "label": 1}]))
    assert load_task_file(tmp_path / "t.json").to_dict() == {"text": ["7"], "label": [1]}


def test_load_errors_name_the_problem(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,y\na,1\n")
    with pytest.raises(UserError, match=r"no label column 'label' \(--label-column names it\); "
                                         r"its columns are \['text', 'y'\]"):
        load_task_file(path)
    with pytest.raises(UserError, match="does not exist"):
        load_task_file(tmp_path / "missing.csv")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(UserError, match=r"unsupported extension '\.txt'.*\.csv, \.jsonl, \.json, \.parquet"):
        load_task_file(tmp_path / "t.txt")
    path.write_text("text,label\na,-1\n")
    with pytest.raises(UserError, match="non-negative integers or strings"):
        load_task_file(path)



def _rows(path, labels):
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    return path


def test_test_file_shares_the_task_files_label_ids(tmp_path):
    task = load_task_file(_rows(tmp_path / "task.jsonl", ["pos", "neg", "pos", "neg"]))
    assert task["label"] == [1, 0, 1, 0] and task.features["label"].names == ["neg", "pos"]
    # Alone, a file holding only "pos" would number it 0; beside the task file it must be 1.
    only_pos = _rows(tmp_path / "test.jsonl", ["pos", "pos"])
    assert load_task_file(only_pos)["label"] == [0, 0]
    test = load_task_file(only_pos, like=task)
    assert test["label"] == [1, 1] and test.features["label"].names == ["neg", "pos"]
    with pytest.raises(UserError, match=r"label\(s\) \['neutral'\] are not among .*accepted: \['neg', 'pos'\]"):
        load_task_file(_rows(tmp_path / "t2.jsonl", ["pos", "neutral"]), like=task)
    with pytest.raises(UserError, match=r"holds integers, but the task file's labels are the names \['neg', 'pos'\]"):
        load_task_file(_rows(tmp_path / "t3.jsonl", [1, 0]), like=task)
    ints = load_task_file(_rows(tmp_path / "t4.jsonl", [2, 0, 1]))
    assert load_task_file(_rows(tmp_path / "t5.jsonl", [1]), like=ints)["label"] == [1]
    with pytest.raises(UserError, match="holds strings, but the task file's labels are integers"):
        load_task_file(_rows(tmp_path / "t6.jsonl", ["pos"]), like=ints)


def test_check_label_ids():
    check_label_ids([0, 1, 1, 0], 2, "f", exact=True)
    check_label_ids([1, 1], 2, "f", exact=False)  # a test file may lack a class
    with pytest.raises(UserError, match=r"f: 2 label words but no examples of class id\(s\) \[0\]"):
        check_label_ids([1, 1], 2, "f", exact=True)
    with pytest.raises(UserError, match=r"f: label id\(s\) \[2, 5\] have no label word; 2 words cover ids 0..1"):
        check_label_ids([0, 5, 2, 1], 2, "f", exact=False)


def test_configured_task_numbers_the_test_file_by_the_task_file(tmp_path):
    from raydapt.bbt.config import BBTConfig
    from raydapt.bbt.inputs import load_configured_task

    task = _rows(tmp_path / "task.jsonl", ["neg", "pos"] * 4)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": t, "label": "pos"}) + "\n" for t in ("x", "y")))
    loaded = load_configured_task(BBTConfig(task=str(task), test_file=str(test), verbalizer=" bad, good", k_shot=2))
    assert loaded.test["text"] == ["x", "y"] and loaded.test["label"] == [1, 1]
    assert loaded.verbalizer == [" bad", " good"]
    assert sorted(loaded.train["label"]) == [0, 0, 1, 1]
    with pytest.raises(UserError, match=r"^--verbalizer: 3 words for the 2 classes of --task.*neg, pos$"):
        load_configured_task(BBTConfig(task=str(task), verbalizer=" a, b, c", k_shot=2))


def _pool(n_per_class=10, classes=3):
    from datasets import Dataset
    rows = [(f"c{c}-{i}", c) for c in range(classes) for i in range(n_per_class)]
    return Dataset.from_dict({"text": [t for t, _ in rows], "label": [c for _, c in rows]})


def test_few_shot_seeded_and_disjoint():
    pool = _pool()
    train, dev = few_shot(pool, k=4, seed=3)
    again, _ = few_shot(pool, k=4, seed=3)
    other, _ = few_shot(pool, k=4, seed=4)
    assert train["text"] == again["text"]
    assert set(train["text"]) != set(other["text"])
    assert not set(train["text"]) & set(dev["text"])
    for part in (train, dev):
        assert np.bincount(part["label"]).tolist() == [4, 4, 4]
        assert all(t.startswith(f"c{c}-") for t, c in zip(part["text"], part["label"]))


def test_few_shot_too_few_examples():
    with pytest.raises(UserError, match=r"class 0 has 10 examples; k=6 needs 2k=12"):
        few_shot(_pool(), k=6, seed=0)


def test_encode_examples_padding_and_placeholders(tokenizer):
    template = "{text}\nimport"
    ids, lengths = encode_examples(tokenizer, ["def hello(world):", "x"], template,
                                   prompt_tokens=3, placeholder_id=7)
    rows = [tokenizer.encode(template.format(text=t), add_special_tokens=False)
            for t in ["def hello(world):", "x"]]
    assert ids.dtype == np.int64 and lengths.dtype == np.int64
    assert ids.shape == (2, 3 + max(map(len, rows)))
    assert lengths.tolist() == [3 + len(r) for r in rows]
    for row, ref, n in zip(ids, rows, lengths):
        assert row[:3].tolist() == [7, 7, 7]
        assert row[3:n].tolist() == ref
        assert (row[n:] == tokenizer.pad_token_id).all()
    assert tokenizer.bos_token_id not in ids[:, 3:]  # no BOS/EOS added
    assert tokenizer.convert_tokens_to_ids(EOS) == tokenizer.eos_token_id


def test_encode_examples_truncates_text_from_the_left(tokenizer):
    text = " ".join(f"w{i}" for i in range(40))
    ids, lengths = encode_examples(tokenizer, [text, "x"], "{text}\nimport", prompt_tokens=2,
                                   placeholder_id=5, max_length=12)
    assert ids.shape[1] <= 12 and lengths[0] <= 12
    tail = tokenizer.decode(ids[0, 2: lengths[0]])
    assert tail.endswith("w39\nimport") and not tail.startswith("w0 ")
    with pytest.raises(UserError, match="template alone"):
        encode_examples(tokenizer, ["x"], "def hello(world):\n    return {text}", max_length=2)


def test_label_token_ids(tokenizer):
    word_ids = label_token_ids(tokenizer, [" email", " socket"])
    assert [tokenizer.decode([i]) for i in word_ids] == [" email", " socket"]
    with pytest.raises(UserError, match="label word ' zebra' is [0-9]+ tokens"):
        label_token_ids(tokenizer, [" email", " zebra"])


def _offered(message: str) -> list[str]:
    """The words a multi-token error offers, read back from its one line."""
    import ast
    offer = message.split("Single-token words it has: ", 1)[1].split("; or use", 1)[0]
    return [] if offer == "none found" else list(ast.literal_eval(f"[{offer}]"))


def test_a_multi_token_label_word_gets_single_token_alternatives(tokenizer):
    with pytest.raises(UserError) as e:
        label_token_ids(tokenizer, [" emails", " socket"])
    message = str(e.value)
    assert "\n" not in message and "' emails' is" in message
    offered = _offered(message)
    assert " email" in offered  # spelled like the word, and one token (label_token_ids took it above)
    assert offered and all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in offered)
    assert " emails" not in offered and all(w.startswith(" ") for w in offered)


def test_default_tokenizer_offers_bad_and_ok_for_good():
    from transformers import AutoTokenizer

    from raydapt.defaults import default_model_dir
    from raydapt.data.tasks import single_token_alternatives

    tok = AutoTokenizer.from_pretrained(default_model_dir("large"))
    assert [len(tok.encode(w, add_special_tokens=False)) for w in (" good", " bad", " ok")] == [2, 1, 1]
    with pytest.raises(UserError) as e:
        label_token_ids(tok, [" bad", " good"])
    offered = _offered(str(e.value))
    assert {" bad", " ok"} <= set(offered) and " good" not in offered
    assert all(len(tok.encode(w, add_special_tokens=False)) == 1 for w in offered)
    common, near = single_token_alternatives(tok, "Good")  # no leading space, capitalised: offers the same form
    assert common and all(w[:1].isupper() and not w.startswith(" ") for w in common)
    assert all(not w.startswith(" ") for w in near)


def test_held_out_split_is_by_path_and_about_the_stated_share():
    files = discover_files()
    held = [f for f in files if is_held_out(f)]
    assert abs(len(held) / len(files) - HELD_OUT_PERCENT / 100) < 0.05
    assert [is_held_out(f) for f in files] == [is_held_out(f) for f in files]
    assert not any(part in ("site-packages", "__pycache__") for f in files for part in f.split("/"))


def test_try_blocks_take_the_first_handler():
    from raydapt.data.make_default_task import try_blocks

    source = ("def f(p):\n    try:\n        fd = open(p)\n\n        x = 1\n    except OSError as e:\n"
              "        pass\n    except ValueError:\n        pass\n    try:\n        g()\n    except:\n        pass\n")
    assert try_blocks(source) == [("try:\n    fd = open(p)\n\n    x = 1", "OSError")]


def test_label_word_errors_name_the_flag_that_chose_the_words(tokenizer):
    from raydapt.bbt.inputs import check_label_words
    from raydapt.data.tasks import Task

    mine = Task(name="t.csv", template="{text}", verbalizer=[" email", " zebra"], train=None, dev=None, test=None)
    builtin = Task(name="stdlib-except", template="{text}", verbalizer=[" email", " zebra"], train=None, dev=None,
                   test=None, builtin=True)
    assert check_label_words(tokenizer, Task(**{**mine.__dict__, "verbalizer": [" email", " socket"]})) == \
        label_token_ids(tokenizer, [" email", " socket"])
    with pytest.raises(UserError, match=r"^--verbalizer: label word ' zebra' is \d+ tokens"):
        check_label_words(tokenizer, mine)
    with pytest.raises(UserError, match=r"^--model: the built-in task's label word ' zebra' is \d+ tokens"):
        check_label_words(tokenizer, builtin)
    from raydapt.data.tasks import default_task
    assert default_task(seed=1, k=2).builtin
