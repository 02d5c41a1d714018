"""Every bad input to every entry point: one `error: ...` line naming the flag, exit status 2, no
traceback, nothing written, and before Ray or any actor starts.

One table, ROWS, one row per (entry point, argv, fragments the error line must contain). `{name}` in
an argv is an input file made below; `{out}` is the row's output directory (or file), which must not
exist afterwards.

`test_bad_input` runs every row in this process (`run_in_process`): the entry script is loaded as a
module and its `main(argv)` called with stdout, stderr, warnings and log output captured as a real
process would print them, while a guard makes `ray.init`, creating any actor, task or placement
group (Ray Train's fit creates actors too) raise. A row that reaches Ray before its check therefore
fails loudly, even when this pytest session has a Ray cluster up; a 20 s bound backstops slow work
that needs no Ray (training in `--local`, a large model load). In process a row typically costs well
under a second instead of 5-8 s of interpreter start and imports; the guard, not a timer, is what
proves the check comes before Ray.

`test_script_exit_path` runs the first row of each entry point as a real subprocess, as a user would:
the in-process rows prove the checks, these prove each script's real path (its imports print
nothing, `sys.exit(2)` reaches the shell, one line on the real stderr).

`run_in_process` and the guard live in tests/entry_points.py: other tests of bad input use them too.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raydapt.defaults import default_model_dir
from tests.test_score_adapters import bad_adapter_inputs
from tests.entry_points import (NO_RAY, RayStartedError, _MODULES, assert_one_line_error, run_entry_point,
                                 run_in_process)

ROOT = Path(__file__).resolve().parents[1]
SCORE = ["-m", "actors.cli", "score", "--local"]

TASK = "--task {task} --verbalizer ' neg, pos'"  # string labels: neg -> 0, pos -> 1

# (entry point, argv, fragments of the error line). Split with shlex-like rules by `split` below.
ROWS = [
    # Point 4 of issue 11, each item on the jobs it applies to.
    ("jobs/bbt.py", "--log-every 0", ["--log-every", ">= 1, got 0"]),
    ("jobs/gdfo.py", "--log-every -3", ["--log-every", ">= 1, got -3"]),
    ("jobs/bbt.py", "--alpha 0", ["--alpha", "> 0, got 0.0"]),
    ("jobs/gdfo.py", "--alpha -1", ["--alpha", "> 0, got -1.0"]),
    ("jobs/bbt.py", "--alpha nan", ["--alpha", "finite"]),
    ("jobs/bbt.py", "--task {task} --verbalizer ' a, b, c'",
     ["--verbalizer", "3 words for the 2 classes", "neg, pos"]),
    ("jobs/gdfo.py", "--task {int_task} --verbalizer ' a, b'", ["--verbalizer", "label id(s) [2] have no label word"]),
    ("jobs/prompt_tuning.py", "--task {task} --verbalizer ' a, b, c'", ["--verbalizer", "3 words", "neg, pos"]),
    ("jobs/bbt.py", "--task {gap_task} --verbalizer ' a, b, c'", ["--verbalizer", "no examples of class id(s) [1]"]),
    ("jobs/bbt.py", "--verbalizer ' a, b'", ["--verbalizer", "needs --task"]),
    ("jobs/bbt.py", "--task {task} --verbalizer ' a, a'", ["--verbalizer", "repeats a word"]),
    ("jobs/bbt.py", "--task {task} --verbalizer ' a,'", ["--verbalizer", "empty word"]),
    ("jobs/bbt.py", "--task {task} --verbalizer ' neg, pos' --template 'no slot'", ["--template", "{text}"]),
    ("jobs/bbt.py", f"{TASK} --test-file {{test_unknown}}",
     ["--test-file", "['neutral']", "accepted: ['neg', 'pos']"]),
    ("jobs/gdfo.py", f"{TASK} --test-file {{test_ints}}", ["--test-file", "integers", "['neg', 'pos']"]),
    ("jobs/prompt_tuning.py", f"{TASK} --test-file {{test_unknown}}", ["--test-file", "['neutral']", "'neg', 'pos'"]),
    ("jobs/bbt.py", "--task {int_task} --verbalizer ' a, b, c' --test-file {test_strings}",
     ["--test-file", "strings", "integers"]),
    ("jobs/bbt.py", "--task {task} --verbalizer ' neg, pos' --k-shot 50", ["--k-shot 50", "60 examples", "2k=100"]),
    ("jobs/prompt_tuning.py", "--model {missing}", ["--model", "does not exist"]),
    ("jobs/prompt_tuning.py", "--model {bert}", ["--model", "unsupported architecture 'bert'", "gpt2, opt, llama"]),
    ("jobs/prompt_tuning.py", "--model {garbage}", ["--model", "corrupted safetensors file"]),
    ("jobs/prompt_tuning.py", "--steps 0", ["--steps", ">= 1"]),
    ("jobs/gdfo.py", "--replay -1", ["--replay", ">= 0, got -1"]),
    ("jobs/bbt.py", "--cpus-per-stage 0", ["--cpus-per-stage", "> 0, got 0.0"]),
    ("jobs/gdfo.py", "--cpus-per-stage -1", ["--cpus-per-stage", "> 0"]),
    ("jobs/comblm.py", "--cpus-per-stage 0", ["--cpus-per-stage", "> 0"]),
    ("jobs/comblm.py", "--cpus-per-worker 0", ["--cpus-per-worker", "> 0"]),
    ("jobs/bbt.py", "--gpus-per-stage -1", ["--gpus-per-stage", ">= 0"]),
    ("jobs/suite.py", "--runs bbt-cma,nope", ["--runs", "['nope']", "accepted: bbt-cma, bbt-ng-CMA"]),
    ("jobs/suite.py", "--runs bbt-cma,bbt-cma", ["--runs", "repeats"]),
    ("jobs/suite.py", "--seeds 1,x", ["--seeds", "'1,x'", "positive integers"]),
    ("jobs/suite.py", "--seeds 0", ["--seeds", "'0'", "positive integers"]),
    ("jobs/suite.py", "--seeds 1,1", ["--seeds", "distinct"]),
    ("jobs/suite.py", "--preset fast", ["--preset", "'quick', 'default'"]),
    # Flags and values every job shares (argparse's own errors are one line too).
    ("jobs/bbt.py", "--popsize 1", ["--popsize", ">= 2"]),
    ("jobs/bbt.py", "--budget 5 --popsize 10", ["--budget", "smaller than one population"]),
    ("jobs/bbt.py", "--optimizer Nonsense", ["--optimizer", "Nonsense"]),
    ("jobs/bbt.py", "--bound -1", ["--bound", ">= 0, got -1.0"]),
    ("jobs/bbt.py", "--bound 5 --optimizer TwoPointsDE", ["--bound", "needs --optimizer cma or lq-cma"]),
    ("jobs/gdfo.py", "--optimizer lq-cma", ["--optimizer", "lq-cma", "extra"]),
    ("jobs/gdfo.py", "--trust-window 0", ["--trust-window", ">= 1, got 0"]),
    ("jobs/bbt.py", "--placement SIDEWAYS", ["--placement", "PACK"]),
    ("jobs/bbt.py", "--popsize ten", ["--popsize", "expected int"]),
    ("jobs/bbt.py", "--no-such-flag 1", ["unrecognized arguments: --no-such-flag"]),
    ("jobs/gdfo.py", "--temperature 0", ["--temperature", "> 0"]),
    ("jobs/comblm.py", "--combiners mean,nope", ["--combiners", "'nope'", "constant_scalar"]),
    # Point 5 of issue 12: errors that name the flag (and the way forward), on every job they apply to.
    ("jobs/bbt.py", "--task {no_label_task} --verbalizer ' a, b'",
     ["--task", "no label column 'label' (--label-column names it)", "['text', 'y']"]),
    ("jobs/gdfo.py", "--task {no_label_task} --verbalizer ' a, b'", ["--task", "no label column 'label'"]),
    ("jobs/prompt_tuning.py", "--task {no_label_task} --verbalizer ' a, b'", ["--task", "no label column 'label'"]),
    ("jobs/bbt.py", "--task {task} --verbalizer ' bad, good'",  # ' good' is 2 tokens of the default tokenizer
     ["--verbalizer", "' good' is 2 tokens ['Ġgo', 'od']", "Single-token words it has: ' bad', ' no',", "' ok'"]),
    ("jobs/gdfo.py", "--task {task} --verbalizer ' bad, good'", ["--verbalizer", "--student", "' good' is 2 tokens", "' ok'"]),
    ("jobs/prompt_tuning.py", "--task {task} --verbalizer ' positive, negative'",
     ["--verbalizer", "' positive' is 2 tokens", "' ok'"]),
    ("jobs/bbt.py", "--config {bad_yaml}", ["--config", "bad.yaml: unknown field 'popsiz' (did you mean 'popsize'?)",
                                            "accepted: alpha, bound, budget,"]),
    ("jobs/gdfo.py", "--config {bad_yaml}", ["--config", "bad.yaml: unknown field 'popsiz' (did you mean 'popsize'?)"]),
    ("jobs/prompt_tuning.py", "--config {bad_yaml}", ["--config", "bad.yaml: unknown field 'popsiz'"]),
    ("jobs/comblm.py", "--config {bad_yaml_comblm}",
     ["--config", "comblm.yaml: unknown field 'hiden' (did you mean 'hidden'?)"]),
    ("jobs/bbt.py", "--model {missing}", ["--model", "no-such-checkpoint does not exist", "leave --model out"]),
    ("jobs/gdfo.py", "--model {missing}", ["--model", "does not exist"]),
    ("jobs/gdfo.py", "--student {missing}", ["--student", "does not exist", "the built small LM"]),
    ("jobs/comblm.py", "--model {missing}", ["--model", "does not exist"]),
    ("jobs/comblm.py", "--expert {blocker}", ["--expert", "is not a directory"]),
    # jobs/idpt.py (issue 13): each bad input before the pool starts.
    ("jobs/idpt.py", "--tasks exception,nope", ["--tasks", "unknown task 'nope'", "accepted: exception"]),
    ("jobs/idpt.py", "--prompt-length 250", ["--prompt-length 250", "exceeds the model's context of 256"]),
    ("jobs/idpt.py", "--generator {other_tokenizer}", ["--generator", "tokenizer differs from --model's"]),
    ("jobs/idpt.py", "--lr 0", ["--lr", "> 0, got 0.0"]),
    ("jobs/idpt.py", "--lr -0.1", ["--lr", "> 0"]),
    ("jobs/idpt.py", "--method frozen", ["--method", "'idpt', 'static'"]),
    ("jobs/idpt.py", "--tasks-dir {missing}", ["no-such-checkpoint"]),
    ("jobs/idpt.py", "--stages 9", ["--stages 9", "4 layers"]),
    ("jobs/idpt.py", "--local --fault-injection kill-stage:after-calls=1", ["--fault-injection", "--local"]),
    # jobs/recursive.py (issue 13, part 5): each bad input before the pool starts.
    ("jobs/recursive.py", "--task nope", ["--task 'nope'", "unknown task", "accepted (generation tasks): function_name"]),
    ("jobs/recursive.py", "--task exception", ["--task 'exception'", "is a classification task"]),
    ("jobs/recursive.py", "--lr 0", ["--lr", "> 0, got 0.0"]),
    ("jobs/recursive.py", "--temperature -1", ["--temperature", "> 0"]),
    ("jobs/recursive.py", "--method textual --prompt-length 230",
     ["--prompt-length 230", "pass 1's answers", "exceeds the model's context of 256"]),
    ("jobs/recursive.py", "--method neural --states 40", ["--states 40", "shortest input has"]),
    ("jobs/recursive.py", "--method twice", ["--method", "'one_pass', 'textual', 'neural'"]),
    ("jobs/recursive.py", "--resume --output-dir {recursive_run}", ["--resume", "different config", "lr: 0.5 there"]),
    # jobs/extend.py (issue 14): each bad input before Ray Train starts.
    ("jobs/extend.py", "--extra-params 0", ["--extra-params", "(0, 1], got 0.0"]),
    ("jobs/extend.py", "--extra-params 1.5", ["--extra-params", "(0, 1], got 1.5"]),
    ("jobs/extend.py", "--alpha -0.01", ["--alpha", ">= 0, got -0.01"]),
    ("jobs/extend.py", "--new-domain {missing}", ["--new-domain", "does not exist"]),
    ("jobs/extend.py", "--new-domain {blocker}", ["--new-domain", "holds no text"]),  # an empty file
    ("jobs/extend.py", "--locale-dir {missing}", ["--new-domain", "no gettext catalogs", "give a new-language corpus"]),
    ("jobs/extend.py", "--original-eval {missing}", ["--original-eval", "does not exist"]),
    ("jobs/extend.py", "--batch 3", ["--batch", "not a multiple of --workers 2"]),
    ("jobs/extend.py", "--method prefix", ["--method", "'neutral', 'neutral-no-l1'"]),
    ("jobs/extend.py", "--context 1000", ["--context 1000", "context of 256"]),
    # jobs/mltd.py (issue 15): each bad input before Ray Train starts.
    ("jobs/mltd.py", "--rank 0", ["--rank", "integer >= 1", "4 to 32"]),
    ("jobs/mltd.py", "--rank 300 --method tarp", ["--rank: 300 is larger than layer", "accepted: 1 to 256"]),
    ("jobs/mltd.py", "--rank 65 --tarp kronecker", ["--rank: 65 is larger than layer", "accepted: 1 to 64"]),
    ("jobs/mltd.py", "--tams-ops zero,conv7", ["--tams-ops", "unknown operation 'conv7'", "conv3, conv5"]),
    ("jobs/mltd.py", "--domains-dir {mltd_domains_small} --context 32 --model {small_lm}",
     ["domain tiny: 0 training sequences", "fewer than one inner batch (--inner-batch 4)"]),
    ("jobs/mltd.py", "--meta-batch 1 --workers 2", ["--meta-batch", "cannot be spread over --workers 2", ">= 2"]),
    ("jobs/mltd.py", "--domains-dir {mltd_domains_small} --meta-test-domains nowhere --model {small_lm}",
     ["--meta-test-domains: 'nowhere' is not a held-out domain"]),
    # jobs/reader.py (issue 16): each bad input before the pool starts, nothing written.
    ("jobs/reader.py", "--corpus {blocker}", ["--corpus", "is empty", "\"id\", \"text\""]),
    ("jobs/reader.py", "--task-dir {reader_no_answer}", ["--task-dir", "no answer column", "\"answer\": str"]),
    ("jobs/reader.py", "--index-dir {reader_other_index}", ["--index-dir", "built from another corpus", "rebuild it"]),
    ("jobs/reader.py", "--context 40", ["context of 40 positions cannot hold one passage", "the longest passage needs"]),
    ("jobs/reader.py", "--context 300", ["--context 300", "context of 256"]),
    ("jobs/reader.py", "--mode reranked", ["--mode", "'closed_book', 'retriever', 'reranker'"]),
    ("jobs/reader.py", "--fault-injection kill-worker:after-steps=2", ["--fault-injection", "needs --mode reranker"]),
    ("jobs/reader.py", "--mode reranker --reranker-batch 3", ["--reranker-batch", "not a multiple of --reranker-workers 2"]),
    # `raydapt score`: bad checkpoints and corpora.
    (SCORE, "--model {missing} --input {corpus} --output {out}", ["does not exist"]),
    (SCORE, "--model {bert} --input {corpus} --output {out}",
     ["unsupported architecture 'bert'", "gpt2, opt, llama, mistral, qwen2"]),
    (SCORE, "--model {garbage} --input {corpus} --output {out}", ["corrupted safetensors file"]),
    (SCORE, "--model {truncated} --input {corpus} --output {out}", ["corrupted safetensors file"]),
    (SCORE, "--model {llama} --input {corpus_bad_json} --output {out}", ["line 2: not valid JSON"]),
    (SCORE, "--model {llama} --input {corpus_no_ids} --output {out}", ["line 1: needs a \"text\"", "\"input_ids\""]),
    (SCORE, "--input {corpus_empty_text} --output {out}", ["--input", "line 2: \"text\" has no tokens"]),
    (SCORE, "--model {llama} --input {corpus_text} --output {out}", ["has no usable tokenizer", "give \"input_ids\""]),
    (SCORE, "--model {llama} --input {corpus_long} --output {out}",
     ["line 1: 65 tokens, longer than the model's context of 64"]),
    (SCORE, "--model {llama} --stages 5 --input {corpus} --output {out}", ["--stages 5", "4 layers"]),
    (SCORE, "--model {llama} --input {corpus} --output {blocker}/o.parquet", ["--output", "does not exist"]),
    (SCORE, "--input {corpus} --output {out} --top-k -1", ["--top-k"]),
    # `raydapt score --adapters` (issue 14): adapter files that do not extend --model, refused before a stage starts.
    (SCORE, "--model {llama} --adapters {adapters_gpt2} --input {corpus} --output {out}",
     ["--adapters", "was trained on another backbone", "\"model_type\": \"gpt2\"", "\"model_type\": \"llama\""]),
    (SCORE, "--model {llama} --adapters {adapters_qwen2_unrecorded} --input {corpus} --output {out}",
     ["--adapters", "does not fit the backbone", "in the file and (", "in the model"]),
    (SCORE, "--model {llama} --adapters {missing} --input {corpus} --output {out}", ["--adapters", "does not exist"]),
    (SCORE, "--model {llama} --adapters {adapters_empty_run} --input {corpus} --output {out}",
     ["--adapters", "holds no adapters.safetensors"]),
    (SCORE, "--model {llama} --adapters {adapters_garbage} --input {corpus} --output {out}",
     ["--adapters", "not a readable safetensors file"]),
    (SCORE, "--model {llama} --adapters {adapters_truncated} --input {corpus} --output {out}",
     ["--adapters", "not a readable safetensors file"]),
    (SCORE, "--model {llama} --adapters {adapters_headerless} --input {corpus} --output {out}",
     ["--adapters", "carries no adapter config", "not written by jobs/extend.py"]),
    (SCORE, "--model {llama} --adapters {adapters_lora} --input {corpus} --output {out}",
     ["--adapters", "holds lora", "python -m raydapt.extend.export", "--model OUT_DIR"]),
    (SCORE, "--adapters {adapters_moved} --input {corpus} --output {out}",
     ["--adapters", "moved-backbone) is not here; give it with --model"]),
]


def split(argv: str) -> list[str]:
    import shlex
    return shlex.split(argv)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _checkpoint(tmp: Path, tiny_checkpoints, kind: str) -> Path:
    directory = tmp / kind
    shutil.copytree(tiny_checkpoints["llama"][0], directory)
    if kind == "bert":
        (directory / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    elif kind == "garbage":
        (directory / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif kind == "truncated":
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    return directory


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoints) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    text = [f"example number {i}" for i in range(120)]
    blocker = tmp / "a-file"
    blocker.write_text("")
    return {
        "task": _jsonl(tmp / "task.jsonl", [{"text": t, "label": ("neg", "pos")[i % 2]} for i, t in enumerate(text)]),
        "int_task": _jsonl(tmp / "int_task.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(text)]),
        "gap_task": _jsonl(tmp / "gap_task.jsonl", [{"text": t, "label": (0, 2)[i % 2]} for i, t in enumerate(text)]),
        "test_unknown": _jsonl(tmp / "test_unknown.jsonl", [{"text": "a", "label": "pos"},
                                                            {"text": "b", "label": "neutral"}]),
        "test_ints": _jsonl(tmp / "test_ints.jsonl", [{"text": "a", "label": 1}]),
        "test_strings": _jsonl(tmp / "test_strings.jsonl", [{"text": "a", "label": "pos"}]),
        "no_label_task": _jsonl(tmp / "no_label.jsonl", [{"text": t, "y": i % 2} for i, t in enumerate(text)]),
        "bad_yaml": _write(tmp / "bad.yaml", "popsiz: 12\n"),
        "bad_yaml_comblm": _write(tmp / "comblm.yaml", "hiden: 64\n"),
        "missing": tmp / "no-such-checkpoint",
        **{kind: _checkpoint(tmp, tiny_checkpoints, kind) for kind in ("bert", "garbage", "truncated")},
        "llama": tiny_checkpoints["llama"][0],
        "corpus": _jsonl(tmp / "in.jsonl", [{"input_ids": [1, 2, 3, 4]}]),
        "corpus_bad_json": _write(tmp / "bad1.jsonl", '{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n'),
        "corpus_no_ids": _jsonl(tmp / "bad2.jsonl", [{"tokens": [1, 2]}]),
        "corpus_empty_text": _jsonl(tmp / "bad4.jsonl", [{"text": "x = 1"}, {"text": ""}]),
        "corpus_text": _jsonl(tmp / "text.jsonl", [{"text": "x = 1"}]),  # the tiny llama has no tokenizer files
        "corpus_long": _jsonl(tmp / "bad3.jsonl", [{"input_ids": list(range(65))}]),
        "blocker": blocker,
        "other_tokenizer": _other_tokenizer(tmp),
        "recursive_run": _recursive_run(tmp),
        **bad_adapter_inputs(tmp, tiny_checkpoints),
        "mltd_domains_small": _mltd_domains(tmp),
        "small_lm": default_model_dir("small"),
        **_reader_inputs(tmp),
    }


def _mltd_domains(tmp: Path) -> Path:
    from tests.test_mltd import user_domains
    return user_domains(tmp, small=True)


def _reader_inputs(tmp: Path) -> dict[str, Path]:
    """An open-book task whose train split lacks the answer column, and an index of another corpus."""
    from raydapt.data.make_openbook import default_openbook_dir
    from raydapt.reader.retrieval import Corpus, build_index, save_index
    task = tmp / "reader-no-answer"
    task.mkdir()
    for name in ("task.json", "dev.jsonl", "test.jsonl"):
        shutil.copy(default_openbook_dir() / name, task)
    _jsonl(task / "train.jsonl", [{"question": "Return the current file position.", "passage_id": "x"}])
    other = Corpus(["a", "b"], ["def tell(self):\n    return self._pos", "def seek(self, n):\n    self._pos = n"])
    save_index(build_index(other), other, tmp / "reader-other-index")
    return {"reader_no_answer": task, "reader_other_index": tmp / "reader-other-index"}


def _other_tokenizer(tmp: Path) -> Path:
    """The default small LM with a tokenizer of its own: a generator that cannot read --model's ids."""
    from raydapt.pretrain import train_tokenizer
    directory = tmp / "other-tokenizer"
    shutil.copytree(default_model_dir("small"), directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    train_tokenizer(["def other(x):\n    return x * 2\n"] * 50, vocab_size=300, context=256).save_pretrained(directory)
    return directory


def _recursive_run(tmp: Path) -> Path:
    """A jobs/recursive.py output dir holding a run of another learning rate: --resume must refuse it."""
    from raydapt.config import to_dict
    from raydapt.defaults import default_model_dir
    from raydapt.recursive.config import RecursiveConfig
    directory = tmp / "recursive-run"
    directory.mkdir()
    saved = RecursiveConfig(output_dir=str(directory), model=str(default_model_dir("large")), lr=0.5)
    (directory / "config.json").write_text(json.dumps(to_dict(saved)))
    return directory


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _row_id(row) -> str:
    entry, argv, _ = row
    name = "score" if isinstance(entry, list) else Path(entry).stem
    return f"{name}:{argv}"


def _row_args(row, tmp_path: Path, inputs: dict) -> tuple[list[str], Path]:
    """The row's argv with its inputs filled in, and the output it must not write."""
    entry, argv, _ = row
    out = tmp_path / ("out.parquet" if isinstance(entry, list) else "out")
    args = [a.format(out=out, **inputs) for a in split(argv)]
    if not isinstance(entry, list) and "--output-dir" not in args:
        args += ["--output-dir", str(out)]
    return args, out


@pytest.mark.parametrize("entry, argv, fragments", ROWS, ids=[_row_id(r) for r in ROWS])
def test_bad_input(tmp_path, inputs, entry, argv, fragments):
    """Each row in this process, Ray guarded: a check made after Ray (or an actor) starts raises."""
    args, out = _row_args((entry, argv, fragments), tmp_path, inputs)
    result = run_in_process(entry, args)
    assert_one_line_error(result, *fragments)
    assert not out.exists(), f"{out} was written"  # no result.json, no config.json, nothing
    # Checks take well under a second here; a model load or training in this process would take longer.
    assert result.seconds < 20, f"{result.seconds:.1f} s: the check comes after something slow (a model load?)"


def _first_row_per_entry_point() -> list:
    firsts: dict = {}
    for row in ROWS:
        firsts.setdefault(_row_id(row).split(":")[0], row)
    return list(firsts.values())


@pytest.mark.parametrize("entry, argv, fragments", _first_row_per_entry_point(),
                         ids=[_row_id(r) for r in _first_row_per_entry_point()])
def test_script_exit_path(tmp_path, inputs, entry, argv, fragments):
    """Each entry point's first row as a real `python SCRIPT ...` subprocess. test_bad_input proves
    every check in process; this proves each script's own path to the shell: its imports print
    nothing, exit_on_user_error's sys.exit(2) is the process's status, one line on the real stderr.
    Ray's address is a closed port (NO_RAY), so a check made after Ray starts hangs past the timeout."""
    args, out = _row_args((entry, argv, fragments), tmp_path, inputs)
    try:
        result, seconds = run_entry_point(entry, args, timeout=90, env=NO_RAY)
    except subprocess.TimeoutExpired:
        pytest.fail("no error within 90 s: the check comes after Ray starts (it waits for a cluster that is not there)")
    assert_one_line_error(result, *fragments)
    assert not out.exists(), f"{out} was written"
    # Imports and config files take 4-12 s on 2 idle cores; a model load or training would take longer.
    assert seconds < 40, f"{seconds:.1f} s: the check comes after something slow (a model load?)"


# What an entry point might do before refusing its input; each must fail run_in_process.
REACHES_RAY = {
    "ray.init": "ray.init(address='local', num_cpus=1)",
    "an actor": "ray.remote(type('Stage', (), {'f': lambda self: 1})).remote()",
    "a task": "ray.remote(lambda: 1).remote()",
    "a placement group": "from ray.util.placement_group import placement_group\n    placement_group([{'CPU': 1}])",
    "handled": "try:\n        ray.init()\n    except BaseException:\n        pass",  # the error swallowed
}


@pytest.mark.parametrize("what", REACHES_RAY)
def test_run_in_process_fails_an_entry_point_that_reaches_ray_first(tmp_path, what):
    script = tmp_path / "job.py"
    script.write_text(f"""import ray
from raydapt.errors import UserError, exit_on_user_error

@exit_on_user_error
def main(argv):
    {REACHES_RAY[what]}
    raise UserError("--flag: bad")
""")
    expected = (AssertionError, "then handled") if what == "handled" else (RayStartedError, "reached Ray")
    with pytest.raises(expected[0], match=expected[1]):
        run_in_process(script, [])
    # Without Ray the same script is an ordinary bad input.
    script.write_text(script.read_text().replace(REACHES_RAY[what], "pass"))
    _MODULES.pop(script.resolve())
    assert_one_line_error(run_in_process(script, []), "--flag: bad")


def test_run_in_process_prints_what_the_script_prints(tmp_path):
    """What a user would see besides the error line reaches the result here too, line for line as a
    real `python SCRIPT` prints it: warnings (not recorded away by pytest, Python's default filters),
    log records (not captured by pytest's logging plugin), stdout."""
    script = tmp_path / "noisy.py"
    script.write_text("""import logging
import sys
import warnings

import transformers
from raydapt.errors import UserError, exit_on_user_error

@exit_on_user_error
def main(argv):
    print("to stdout")
    warnings.warn("a user warning")
    warnings.warn("a deprecation in the script: shown", DeprecationWarning)
    warnings.warn_explicit("a deprecation in a library: hidden", DeprecationWarning, "lib.py", 1, module="lib")
    logging.getLogger("raydapt.somewhere").warning("a log record")
    logging.getLogger("raydapt.somewhere").info("below WARNING: not printed")
    transformers.utils.logging.get_logger("transformers.x").warning("a transformers warning")
    raise UserError("--flag: bad")

if __name__ == "__main__":
    main(sys.argv[1:])
""")
    result = run_in_process(script, [])
    real = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (result.returncode, result.stdout, result.stderr) == (real.returncode, real.stdout, real.stderr)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and result.stdout == "to stdout\n" and lines[-1] == "error: --flag: bad"
    assert len(lines) == 7, lines  # two lines per warning shown, one per log record
    assert "a log record" in lines and "[transformers] a transformers warning" in lines, lines


def test_run_in_process_leaves_this_process_as_it_was(tmp_path):
    """What an entry point sets for its own run (as the jobs' pin_coordinator_threads does) does not
    reach the tests after it."""
    import datasets
    import numpy as np
    import torch
    import transformers

    script = tmp_path / "setter.py"
    script.write_text(f"""import logging, os, random, sys
import datasets, numpy, torch, transformers
from raydapt.errors import UserError, exit_on_user_error

@exit_on_user_error
def main(argv):
    torch.set_num_threads({torch.get_num_threads() + 1})
    torch.manual_seed(1), numpy.random.seed(1), random.seed(1)
    os.environ["RAYDAPT_TEST_LEAK"] = "1"
    os.chdir({str(tmp_path)!r})
    sys.path.insert(0, "somewhere")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar(), datasets.disable_progress_bars()
    raise UserError("--flag: bad")
""")
    def state():
        return (torch.get_num_threads(), os.environ.get("RAYDAPT_TEST_LEAK"), os.getcwd(), sys.path[:],
                logging.getLogger("transformers").level, transformers.utils.logging.is_progress_bar_enabled(),
                datasets.utils.logging.is_progress_bar_enabled(), random.random(), np.random.random(), torch.rand(1).item())

    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    before = state()
    random.setstate(rng[0]), np.random.set_state(rng[1]), torch.set_rng_state(rng[2])
    assert_one_line_error(run_in_process(script, []), "--flag: bad")
    assert state() == before


def test_unknown_command():
    result = run_in_process(["-m", "actors.cli"], ["frobnicate"])
    assert_one_line_error(result)
    assert result.stderr.strip() == "error: unknown command 'frobnicate'; accepted: score, classify, generate"


def test_table_covers_point_4_of_issue_11():
    """Each bad input the issue names has a row, on every job it applies to."""
    wanted = {"--log-every": {"bbt", "gdfo"}, "--alpha": {"bbt", "gdfo"}, "--verbalizer": {"bbt", "gdfo", "prompt_tuning"},
              "--test-file": {"bbt", "gdfo", "prompt_tuning"}, "--model": {"prompt_tuning"}, "--replay": {"gdfo"},
              "--cpus-per-stage": {"bbt", "gdfo", "comblm"}, "--runs": {"suite"}, "--seeds": {"suite"}}
    for flag, jobs in wanted.items():
        have = {Path(e).stem for e, _, fragments in ROWS if not isinstance(e, list) and fragments[0] == flag}
        assert jobs <= have, (flag, jobs - have)


def test_table_covers_point_5_of_issue_12():
    """Each error point 5 names has a row on every job it applies to, whose line names the flag."""
    def jobs_with(flag: str, text: str) -> set[str]:
        return {Path(e).stem for e, argv, fragments in ROWS if not isinstance(e, list) and fragments[0] == flag
                and any(text in f for f in fragments[1:])}

    assert {"bbt", "gdfo", "prompt_tuning"} <= jobs_with("--task", "no label column")
    assert {"bbt", "gdfo", "prompt_tuning"} <= jobs_with("--verbalizer", "tokens")
    assert {"bbt", "gdfo", "prompt_tuning", "comblm"} <= jobs_with("--config", "(did you mean") | jobs_with(
        "--config", "unknown field")
    assert {"bbt", "gdfo", "comblm"} <= jobs_with("--model", "does not exist")
    assert {"gdfo"} <= jobs_with("--student", "does not exist")


def test_resume_on_a_directory_without_a_run_says_it_starts_fresh(tmp_path, capsys):
    from raydapt.bbt.config import BBTConfig
    from raydapt.bbt.job import prepare_output_dir

    out = tmp_path / "empty"
    out.mkdir()  # an existing directory with nothing in it, as after `mkdir runs/x`
    for directory in (out, tmp_path / "absent"):
        assert prepare_output_dir(BBTConfig(output_dir=str(directory), resume=True)) == (directory, False)
        assert capsys.readouterr().out == f"note: --resume: {directory} holds no run; starting fresh\n"
        assert (directory / "config.json").is_file()  # it did start fresh
    # Now a run is there: a resume continues it (no checkpoint yet: nothing to load), and says nothing.
    assert prepare_output_dir(BBTConfig(output_dir=str(out), resume=True)) == (out, False)
    assert capsys.readouterr().out == ""
    # Without --resume a fresh directory gets no note either.
    prepare_output_dir(BBTConfig(output_dir=str(tmp_path / "plain")))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("entry", ["jobs/bbt.py", "jobs/gdfo.py", "jobs/prompt_tuning.py", "jobs/comblm.py"])
def test_help_states_each_default_once(entry):
    result = run_in_process(entry, ["--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.split())
    assert "(default: None)" not in text and "(default: False)" not in text  # argparse's, beside ours
    model = text.split("--model MODEL ", 1)[1].split(" --", 1)[0]
    assert model.count("default") == 1, model  # "(default: the built large LM)", stated once
    if entry != "jobs/comblm.py":
        assert "(BBT's p0) [default: '\\n']" in text  # --placeholder's newline, visible


def test_prompt_tuning_refuses_a_finished_run_and_writes_result_last(tmp_path):
    out = tmp_path / "g"
    argv = ["--steps", "1", "--prompt-length", "2", "--k-shot", "2", "--output-dir", str(out)]
    first, _ = run_entry_point("jobs/prompt_tuning.py", argv)
    assert first.returncode == 0, first.stderr[-3000:]
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(files) == ["best_prompt.safetensors", "config.json", "result.json"]
    # The built-in task's hand-written prompt, as in README/RESULTS (48.67 %: 73 of 150).
    assert json.loads(files["result.json"])["manual_prompt_test_accuracy"] == 73 / 150
    again = run_in_process("jobs/prompt_tuning.py", [*argv[:-2], "--seed", "5", "--output-dir", str(out)])
    assert_one_line_error(again, "--output-dir", "already holds a finished run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # the old prompt untouched
    # An unfinished run of another config (config.json, no result.json) is refused too.
    (out / "result.json").unlink()
    again = run_in_process("jobs/prompt_tuning.py", [*argv[:-2], "--seed", "5", "--output-dir", str(out)])
    assert_one_line_error(again, "--output-dir", "different config")


def _suite_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("suite_under_test", ROOT / "jobs" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_report_goes_where_output_dir_says(tmp_path):
    suite = _suite_module()
    repo = tmp_path / "repo"
    assert suite.report_paths(repo / "results", repo) == (repo / "RESULTS.md", repo / "README.md")
    assert suite.report_paths(tmp_path / "mine", repo) == (tmp_path / "mine" / "RESULTS.md", None)
    # A finished run under a foreign --output-dir, run from a directory with its own RESULTS.md and
    # README.md: the report lands in the output dir and the working directory is left alone.
    runs, cwd = tmp_path / "mine", tmp_path / "cwd"
    run = runs / "quick" / "bbt-cma-seed1"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"seed": 1, "method": "bbt", "optimizer": "cma", "api_calls": 100,
                                                 "manual_prompt_test_accuracy": 0.5, "dev_accuracy": 0.6,
                                                 "test_accuracy": 0.6}))
    cwd.mkdir()
    readme = "top\n<!-- results:begin -->\nold\n<!-- results:end -->\n"
    (cwd / "README.md").write_text(readme)
    (cwd / "RESULTS.md").write_text("published\n")
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "suite.py"), "--runs", "bbt-cma", "--seeds", "1",
                             "--output-dir", str(runs)], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| bbt-cma | bbt | cma | 1 | 100 | 50.00 | 60.00 | 60.00 |" in (runs / "RESULTS.md").read_text()
    assert (cwd / "README.md").read_text() == readme and (cwd / "RESULTS.md").read_text() == "published\n"
    assert sorted(p.name for p in cwd.iterdir()) == ["README.md", "RESULTS.md"]
