"""Frozen readers: the open-book task's recipe, its BM25 index (checked against a brute-force scan),
the corpus fingerprint, greedy packing and the question files' checks."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydapt.data.make_openbook import default_openbook_dir, functions, _questions
from raydapt.errors import UserError
from raydapt.reader.copying import copy_accuracy
from raydapt.reader.data import load_questions
from raydapt.reader.packing import ReaderTokens, check_budget, encode_rows, pack
from raydapt.reader.reranker import PairTokens, Reranker, group_loss, pair_batch, rerank, standardise, training_groups
from raydapt.reader.retrieval import (BruteForceBM25, Corpus, build_index, load_corpus_file, load_index, open_index,
                                      recall_at, retrieve, words)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_corpus() -> Corpus:
    """The shipped corpus's first 400 passages: real code, small enough to scan."""
    full = load_corpus_file(default_openbook_dir() / "corpus.jsonl")
    return Corpus(full.ids[:400], full.texts[:400])


def test_functions_drop_the_docstring_from_the_passage():
    source = 'class A:\n    def tell(self):\n        """Return the current file position.\n\n        More."""\n' \
             '        return self._pos\n'
    [(pid, name, summary, text)] = functions("m.py", source)
    assert (pid, name, summary) == ("m.py:2:tell", "tell", "Return the current file position.")
    assert text == "def tell(self):\n    return self._pos"


def test_questions_keep_unique_summaries_of_named_functions():
    found = [("a:1:f", "f", "Return the same thing here.", ""), ("b:1:g", "g", "Return the same thing here.", ""),
             ("c:1:__x__", "__x__", "Make a new object now.", ""), ("d:1:h", "h", "Too short.", ""),
             ("e:1:k", "k", "Close the open file handle.", "")]
    assert _questions(found, 4) == [("Close the open file handle.", " k", "e:1:k")]


def test_words_split_identifiers():
    assert words("getFilePosition(self, get_value2)") == ["get", "file", "position", "self", "get", "value", "2"]


def test_index_scores_equal_a_brute_force_scan(small_corpus):
    index = build_index(small_corpus)
    scan = BruteForceBM25([words(t) for t in small_corpus.texts])
    queries = [small_corpus.texts[i].splitlines()[0] for i in (3, 50, 200)] + ["return the the value value"]
    rows, scores = retrieve(index, queries, 10)
    for q, r, s in zip(queries, rows, scores):
        reference = scan.scores(words(q))
        np.testing.assert_allclose(s, np.sort(reference)[::-1][:10], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(reference[r], s, rtol=1e-5, atol=1e-5)


def test_saved_index_loads_only_for_its_corpus(small_corpus, tmp_path):
    index, built = open_index(tmp_path / "index", small_corpus)
    assert built
    again, built = open_index(tmp_path / "index", small_corpus)
    assert not built
    q = [small_corpus.texts[7]]
    assert (retrieve(index, q, 5)[0] == retrieve(again, q, 5)[0]).all()
    other = Corpus(small_corpus.ids, small_corpus.texts[:-1] + [small_corpus.texts[-1] + " x"])
    with pytest.raises(UserError, match="another corpus"):
        load_index(tmp_path / "index", other)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="no fingerprint"):
        open_index(tmp_path / "junk", small_corpus)


def test_recall_at_k():
    rows = np.array([[3, 1, 2], [0, 5, 4]])
    assert recall_at(rows, np.array([1, 4]), (1, 2, 3)) == {"1": 0.0, "2": 0.5, "3": 1.0}


def test_empty_corpus_and_question_file_without_a_column(tmp_path):
    (tmp_path / "corpus.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_corpus_file(tmp_path / "corpus.jsonl")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Why?"}) + "\n")
    with pytest.raises(UserError, match="no answer column"):
        load_questions(tmp_path / "q.jsonl")


def _tokens(passage_lengths, frame=3, answer=2) -> ReaderTokens:
    passages = [[10 + i] * n for i, n in enumerate(passage_lengths)]
    return ReaderTokens(passages=passages, frames=[[7] * frame], answers=[[8] * answer], head=[], separator=[9],
                        pad=1)


class _Copier(torch.nn.Module):
    """A perfect induction head: predicts the token that followed the previous occurrence of this one."""

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 4096)
        for b, row in enumerate(input_ids.tolist()):
            for t, token in enumerate(row):
                before = [i for i in range(t) if row[i] == token]
                if before:
                    logits[b, t, row[before[-1] + 1]] = 1.0
        return type("Out", (), {"logits": logits})


def test_copy_accuracy_separates_a_copier_from_a_model_that_cannot_copy():
    assert copy_accuracy(_Copier(), 4096, rows=4, length=20) == 1.0
    random_lm = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=64))
    assert copy_accuracy(random_lm.eval(), 4096, rows=4, length=20) < 0.05


def test_pack_is_greedy_skips_what_does_not_fit_and_puts_the_best_last():
    tokens = _tokens([10, 30, 5, 4, 20])
    # context 40, prompt 4: room 40 - 4 - 3 - 2 = 31; passage + separator: 11, 31, 6, 5, 21
    packed = pack(tokens, 0, np.array([0, 1, 2, 3, 4]), context=40, prompt_length=4, max_passages=10)
    assert packed == [0, 2, 3]               # 11 + 6 + 5 = 22; 1 (31) and 4 (21) no longer fit
    assert pack(tokens, 0, np.array([1, 0]), 40, 4, 10) == [1]
    assert pack(tokens, 0, np.array([0, 2, 3]), 40, 4, 2) == [0, 2]
    enc = encode_rows(tokens, [packed])
    assert enc.lengths[0] + 4 <= 40
    assert enc.input_ids[0, :5].tolist() == [13] * 4 + [9]          # the worst packed passage first
    assert enc.input_ids[0, 11:21].tolist() == [10] * 10            # the best last, before the frame
    assert enc.target_start[0] == 25 and enc.labels[0, 25:27].tolist() == [8, 8]   # 5 + 6 + 11 + 3


def test_a_context_too_small_for_one_passage_is_refused():
    tokens = _tokens([10, 30])
    assert check_budget(tokens, 40, 4) == 31
    with pytest.raises(UserError, match="cannot hold one passage"):
        check_budget(tokens, 39, 4)


def test_retrieval_bench_runs_on_a_small_task(small_corpus, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_retrieval", ROOT / "bench" / "retrieval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                  for i, t in zip(small_corpus.ids, small_corpus.texts)))
    for split, rows in (("train", range(0, 8)), ("dev", range(8, 12)), ("test", range(12, 16))):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(
            {"question": small_corpus.texts[i].splitlines()[0], "answer": " x", "passage_id": small_corpus.ids[i]}) + "\n"
            for i in rows))
    fig = bench.main(["--task-dir", str(tmp_path), "--scan-queries", "4", "--k", "20",
                      "--output", str(tmp_path / "out.json")])
    assert fig["top1_agrees_with_scan"] == 1.0 and fig["max_top_k_score_gap"] < 1e-4
    assert set(fig["recall"]["test"]) == {"1", "5", "20", "100"} and fig["speedup"] > 0
    assert json.loads((tmp_path / "out.json").read_text())["passages"] == 400


@pytest.fixture(scope="module")
def small_task(tmp_path_factory) -> Path:
    """The shipped task cut down: 12/4/4 questions, a corpus of their gold passages and 300 others."""
    src, out = default_openbook_dir(), tmp_path_factory.mktemp("openbook")
    full = load_corpus_file(src / "corpus.jsonl")
    keep, rows = set(range(300)), full.row()
    for split, n in (("train", 12), ("dev", 4), ("test", 4)):
        lines = (src / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        keep |= {rows[json.loads(line)["passage_id"]] for line in lines}
    (out / "corpus.jsonl").write_text("".join(json.dumps({"id": full.ids[i], "text": full.texts[i]}) + "\n"
                                              for i in sorted(keep)))
    (out / "task.json").write_text((src / "task.json").read_text())
    return out


@pytest.mark.parametrize("mode", ["closed_book", "retriever"])
def test_reader_run_packs_trains_the_prompt_and_records_everything(small_task, tmp_path, mode):
    from safetensors.numpy import load_file

    from actors.runner import LocalRuntime
    from raydapt.reader.config import ReaderConfig
    from raydapt.reader.job import prepare_reader_data, run_reader_job

    cfg = ReaderConfig(mode=mode, task_dir=str(small_task), index_dir=str(tmp_path / "index"), top_n=10, steps=2,
                       eval_every=1, batch=4, local=True, output_dir=str(tmp_path / "run"), seed=3)
    result = run_reader_job(cfg, LocalRuntime())
    packing = result["packing"]
    if mode == "closed_book":
        assert packing["test_mean_passages"] == 0 and not (tmp_path / "index").exists()
    else:
        assert packing["test_mean_passages"] >= 1 and (tmp_path / "index" / "fingerprint.json").is_file()
        assert set(packing["test_recall"]) == {"1", "5"}  # top_n 10: recall@20 and @100 undefined
        assert packing["test_gold_packed"] <= (packing["test_recall"]["5"] if cfg.max_passages <= 5 else 1)
        data, _ = prepare_reader_data(result_config(cfg, small_task))
        assert int(data["train"].lengths.max()) + cfg.prompt_length <= 256
    assert 0 <= result["test_exact_match"] <= 1 and result["n_test"] == 4
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in log)
    prompt = load_file(tmp_path / "run" / "prompt.safetensors")["prompt"]
    import torch
    torch.manual_seed(3)
    draw = torch.randn(8, 256).numpy()  # the prompt started at this draw times a scale; two Adam steps moved it
    scale = float((prompt * draw).sum() / (draw * draw).sum())
    moved = np.linalg.norm(prompt - scale * draw) / np.linalg.norm(prompt)
    assert prompt.shape == (8, 256) and scale > 0 and 1e-3 < moved < 0.9
    assert (tmp_path / "run" / "curve.png").is_file() and (tmp_path / "run" / "result.json").is_file()


READER = [sys.executable, str(ROOT / "jobs" / "reader.py")]


def run_reader(*args) -> None:
    done = subprocess.run([*READER, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def untimed(result: dict) -> dict:
    """What a run computed: not where (index_dir, config), how long, or what its own process served."""
    kept = {k: v for k, v in result.items() if k not in ("wall_time_s", "config", "fault_tolerance", "oracle_usage")}
    return kept | {"packing": {k: v for k, v in result["packing"].items() if k != "index_dir"}}


@pytest.mark.cluster
@pytest.mark.slow
def test_reader_same_bytes_on_1x1_and_after_a_kill_and_a_resume_on_2x2(small_task, tmp_path):
    """Killed in process, resumed on 2 x 2 stage actors (one killed during a training step) with every
    result-neutral field changed (a fresh index in another directory too): the same bytes."""
    from raydapt.reader.config import RESULT_NEUTRAL_FIELDS
    from tests.test_bbt_job import check_resume_changes, kill_mid_run

    small = ["--mode", "retriever", "--task-dir", str(small_task), "--top-n", "10", "--steps", "8",
             "--eval-every", "2", "--batch", "4", "--seed", "3"]
    first_index = ["--local", "--index-dir", str(tmp_path / "index")]
    whole, killed, moved = (tmp_path / n for n in ("whole", "killed", "moved"))
    run_reader(*small, *first_index, "--output-dir", whole)
    before = kill_mid_run([*READER, *small, *first_index], killed, rows=3)
    killed.rename(moved)
    changes = ["--replicas", "2", "--stages", "2", "--cpus-per-stage", "2", "--log-every", "1", "--recompute",
               "--fault-injection", "kill-stage:after-calls=3,stage=1", "--index-dir", str(tmp_path / "index2")]
    run_reader(*small, *changes, "--output-dir", moved, "--resume")
    result = json.loads((moved / "result.json").read_text())
    check_resume_changes(moved / "config.json", result, RESULT_NEUTRAL_FIELDS)
    assert (whole / "prompt.safetensors").read_bytes() == (moved / "prompt.safetensors").read_bytes()
    assert untimed(json.loads((whole / "result.json").read_text())) == untimed(result)
    assert (whole / "log.jsonl").read_text() == (moved / "log.jsonl").read_text()
    assert (moved / "log.jsonl").read_text().splitlines()[:2] == before[:2]  # kept, not redone
    assert result["fault_tolerance"]["injected"] and result["fault_tolerance"]["stage_restarts"] == 1


def result_config(cfg, task_dir):
    import dataclasses

    from raydapt.defaults import default_model_dir
    return dataclasses.replace(cfg, model=str(default_model_dir("large")), corpus=str(task_dir / "corpus.jsonl"))


def _fake_scores(candidates: np.ndarray) -> np.ndarray:
    return np.linspace(5, 1, candidates.shape[1])[None].repeat(len(candidates), 0).astype(np.float32)


def test_training_groups_put_gold_first_and_the_best_wrong_passages_after():
    candidates = np.array([[4, 7, 2, 9], [1, 3, 5, 6]])
    rows, bm25 = training_groups(candidates, _fake_scores(candidates), np.array([7, 8]), negatives=2)
    assert rows.tolist() == [[7, 4, 2], [8, 1, 3]]
    z = standardise(_fake_scores(candidates))
    assert bm25[0].tolist() == [z[0, 1], z[0, 0], z[0, 2]]
    assert bm25[1, 0] == z[1].min()  # the retriever missed 8: it gets the lowest score of the top-N


def test_untrained_reranker_keeps_the_bm25_order_and_learns_from_its_loss(small_corpus):
    import torch
    from transformers import AutoModelForCausalLM

    from raydapt.defaults import default_model_dir

    lm = AutoModelForCausalLM.from_pretrained(default_model_dir("small"), dtype=torch.float32)
    model = Reranker(lm)
    tokens = PairTokens(questions=[[5, 6, 7], [8, 9]], passages=[[10 + i, 11 + i] for i in range(6)], join=[3], pad=1)
    candidates = np.array([[0, 1, 2, 3], [5, 4, 3, 2]])
    scores = np.array([[9.0, 4.0, 3.0, 1.0], [7.0, 6.5, 2.0, 0.5]], np.float32)
    order, _ = rerank(model, tokens, candidates, scores)
    assert (order == candidates).all()  # head at zero, BM25 weight one: BM25's order
    rows, bm25 = training_groups(candidates, scores, np.array([2, 3]), negatives=3)
    model.train()
    loss = group_loss(model, tokens, np.array([0, 1]), rows, bm25)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.bm25_weight.grad != 0
    ids, lengths = pair_batch(tokens, np.array([0, 1]), np.array([4, 5]))
    assert ids.tolist() == [[5, 6, 7, 3, 14, 15], [8, 9, 3, 15, 16, 1]] and lengths.tolist() == [6, 5]


@pytest.mark.cluster
@pytest.mark.slow
def test_reranker_training_survives_a_killed_worker_with_the_same_result(ray_cluster, small_task, tmp_path):
    """Two Ray Train workers, 6 steps, a checkpoint every 2: the last rank dies at step 3 and the run
    ends with the losses and weights of an undisturbed one."""
    from actors.reranker_trainer import train_reranker
    from raydapt.reader.config import ReaderConfig
    from raydapt.reader.job import _resolve, check_and_retrieve
    from raydapt.reader.rerank_run import reranker_config

    cfg = _resolve(ReaderConfig(mode="reranker", task_dir=str(small_task), index_dir=str(tmp_path / "index"),
                                top_n=10, negatives=3, reranker_steps=6, reranker_batch=4, checkpoint_every=2,
                                seed=2))
    got = check_and_retrieve(cfg)
    runs = {}
    for name, kill in (("clean", None), ("killed", 3)):
        runs[name] = train_reranker(cfg, reranker_config(cfg, got, kill), str(tmp_path / name),
                                    str(tmp_path / f"{name}-marker"))
    assert (tmp_path / "killed-marker").exists() and not (tmp_path / "clean-marker").exists()
    assert runs["killed"]["losses"] == runs["clean"]["losses"] and len(runs["clean"]["losses"]) == 6
    for key, value in runs["clean"]["state"].items():
        assert (runs["killed"]["state"][key] == value).all(), key
    assert runs["clean"]["state"]["bm25_weight"].item() != 1.0  # it trained


def test_white_box_reader_answers_like_the_hugging_face_model_and_trains_its_weights():
    import torch
    from transformers import AutoModelForCausalLM

    from raydapt.defaults import default_model_dir
    from raydapt.reader.white_box import WhiteBoxLM, WhiteBoxReader

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(default_model_dir("small"), dtype=torch.float32)
    module = WhiteBoxReader(lm, 3)
    frozen = WhiteBoxLM(module)
    ids = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 1, 1]])
    lengths = np.array([5, 3])
    prompt = module(torch.from_numpy(ids), torch.from_numpy(lengths))
    labels = np.where(np.arange(5)[None] >= 3, ids, -100)
    out = frozen(ids, lengths, labels, prompt=prompt, positions=np.array([[6, 7], [4, 5]]))
    with torch.no_grad():  # the first row alone, no padding: Hugging Face's own forward and loss
        x = torch.cat([module.prompt, lm.get_input_embeddings()(torch.from_numpy(ids[0]))])[None]
        reference = lm(inputs_embeds=x).logits[0]
        nll = torch.nn.functional.cross_entropy(reference[5:7], torch.from_numpy(ids[0, 3:5]), reduction="sum")
    torch.testing.assert_close(out["logits"][0].detach(), reference[[6, 7]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"][0].detach(), nll, rtol=1e-5, atol=1e-5)
    out["loss"].sum().backward()
    assert lm.get_input_embeddings().weight.grad.abs().sum() > 0 and module.prompt.grad.abs().sum() > 0


def test_results_section_pairs_the_seeds():
    from raydapt.results import _reader_section

    def run(name, seed, em, recall=None):
        packing = {"test_mean_passages": 6.0, "test_mean_tokens": 237.0, "test_gold_packed": 0.3}
        if recall is not None:
            packing["test_recall"] = {"1": recall, "5": 0.5}
        return {"_name": name, "seed": seed, "test_exact_match": em, "dev_exact_match": em, "packing": packing,
                "oracle_usage": {"forward_tokens": 1000}, "wall_time_s": 10.0}
    rows = {"reader-retriever": [run("reader-retriever", s, em, 0.2) for s, em in ((1, 0.10), (2, 0.20))],
            "reader-closed_book": [run("reader-closed_book", s, em) for s, em in ((1, 0.0), (2, 0.05))]}
    text = "\n".join(_reader_section("quick", rows))
    assert "| BM25 top passages, packed in retrieval order | 1, 2 | 15.00 ± 7.07 |" in text
    assert "- reader-retriever − reader-closed_book: 12.50 ± 3.54 exact-match points (2 seeds)" in text
    assert "reader-reranker −" not in text
