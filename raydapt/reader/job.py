"""A frozen-reader run from its config to its output directory (Levine et al., 2022).

The questions' passages are retrieved by BM25 (`raydapt.reader.retrieval`), packed greedily into
the reader's context (`raydapt.reader.packing`), and a static soft prompt in front of the frozen
large LM learns by Adam from the LM loss on the answer, back-propagated through the gray-box stages.
The training loop, its checkpoints and the exact-match scoring are input-dependent prompt tuning's
(`raydapt.idpt.job`): the reader's rows are the same kind of rows (prompt, target, end token), so a
resumed run ends with the bytes of an uninterrupted one there as here.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from raydapt.bbt.job import prepare_output_dir
from raydapt.config import to_dict
from raydapt.data.make_openbook import default_openbook_dir
from raydapt.defaults import default_model_dir, raydapt_home
from raydapt.errors import UserError
from raydapt.graybox import graybox_pool_spec, open_frozen_lm
from raydapt.idpt import job as idpt
from raydapt.idpt.generator import StaticPrompt
from raydapt.models.checkpoint import load_tokenizer, model_info
from raydapt.outputs import read_jsonl, save_tensors, write_result
from raydapt.reader.config import RESULT_NEUTRAL_FIELDS
from raydapt.reader.data import load_questions, load_task_info
from raydapt.reader.packing import check_budget, encode_rows, pack, tokenize_reader
from raydapt.comblm.config import parse_fault
from raydapt.reader.rerank_run import rerank_splits
from raydapt.reader.retrieval import check_index, fingerprint, load_corpus_file, open_index, recall_at, retrieve
from raydapt.serving import Runtime, pin_coordinator_threads

__all__ = ["run_reader_job", "check_and_retrieve", "pack_splits", "prepare_reader_data", "Retrieved"]

SPLITS = ("train", "dev", "test")
TASK = SimpleNamespace(names=["openbook"], kinds=["generation"])  # what idpt's loop and scoring read


def _resolve(cfg):
    task_dir = cfg.task_dir or str(default_openbook_dir())
    return dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")), task_dir=task_dir,
                               reranker_model=cfg.reranker_model or str(default_model_dir("small")),
                               corpus=cfg.corpus or str(Path(task_dir) / "corpus.jsonl"))


@dataclass
class Retrieved:
    """What packing needs, computed (and every input checked) before any worker starts."""
    tokens: dict            # split -> ReaderTokens
    candidates: dict        # split -> (Q, N) passage rows, best first (absent: closed book)
    scores: dict            # split -> (Q, N) their retriever scores
    gold: dict              # split -> (Q,) gold passage rows (-1: unknown), or None
    context: int
    report: dict
    tokenizer: object


def check_and_retrieve(cfg) -> Retrieved:
    """Every input check, then each split's top-N passages (none for closed book).

    Reads only; an index is built (and saved) when `--index-dir` holds none."""
    try:
        info = load_task_info(cfg.task_dir)
        splits = {s: load_questions(Path(cfg.task_dir) / f"{s}.jsonl") for s in SPLITS}
    except UserError as e:
        raise UserError(f"--task-dir: {e}")
    try:
        corpus = load_corpus_file(cfg.corpus)
    except UserError as e:
        raise UserError(f"--corpus: {e}")
    tokenizer = load_tokenizer(cfg.model, "model")
    if cfg.mode in ("reranker", "white_box") and load_tokenizer(cfg.reranker_model, "reranker_model").get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--reranker-model {cfg.reranker_model}: its tokenizer differs from --model's; the re-ranker "
                        "reads the reader's token ids, so give a small LM trained with the large LM's tokenizer")
    positions = model_info(cfg.model).max_positions
    context = cfg.context or positions
    if context > positions:
        raise UserError(f"--context {context} exceeds the model's context of {positions} positions")
    index_dir = cfg.index_dir or str(raydapt_home() / "indexes" / fingerprint(corpus)[:16])
    if cfg.mode != "closed_book" and (Path(index_dir) / "fingerprint.json").is_file():
        try:  # an index of another corpus is refused before the slow part (tokenizing the corpus)
            check_index(index_dir, corpus)
        except UserError as e:
            raise UserError(f"--index-dir: {e}")
    passages = tokenize_reader(tokenizer, info["template"], info["end_token"], corpus.texts, [], [], 1).passages
    tokens = {s: tokenize_reader(tokenizer, info["template"], info["end_token"], passages, q.questions, q.answers,
                                 cfg.max_question_tokens) for s, q in splits.items()}
    for t in tokens.values():
        check_budget(t, context, cfg.prompt_length)
    row = corpus.row()
    gold = {s: (np.array([row.get(p, -1) for p in q.passage_ids]) if all(q.passage_ids) else None)
            for s, q in splits.items()}
    if cfg.mode in ("reranker", "white_box") and gold["train"] is None:
        raise UserError(f"--mode {cfg.mode}: the train split needs a passage_id column (the re-ranker's positives)")
    try:
        index = open_index(index_dir, corpus)[0] if cfg.mode != "closed_book" else None
    except UserError as e:
        raise UserError(f"--index-dir: {e}")
    report = {"context": context, "index_dir": index_dir if index else "", "passages": len(corpus.ids)}
    candidates, scores = {}, {}
    for s, q in splits.items():
        if index is not None:
            candidates[s], scores[s] = retrieve(index, q.questions, min(cfg.top_n, len(corpus.ids)))
            if gold[s] is not None:
                report[f"{s}_recall"] = recall_at(candidates[s], gold[s], (1, 5, 20, 100))
    return Retrieved(tokens, candidates, scores, gold, context, report, tokenizer)


def pack_splits(cfg, got: Retrieved, order: dict | None = None) -> tuple[dict, dict]:
    """Each split's reader rows, passages packed in `order` (default: the retriever's), and a report."""
    order = order if order is not None else got.candidates
    data, report = {}, dict(got.report)
    for s, tokens in got.tokens.items():
        n = len(tokens.frames)
        packed = ([pack(tokens, i, c, got.context, cfg.prompt_length, cfg.max_passages) for i, c in enumerate(order[s])]
                  if s in order else [[] for _ in range(n)])
        if s in order and got.gold[s] is not None:
            report[f"{s}_gold_packed"] = float(np.mean([g in p for g, p in zip(got.gold[s], packed)]))
        data[s] = encode_rows(tokens, packed)
        report[f"{s}_mean_passages"] = float(np.mean([len(p) for p in packed]))
        report[f"{s}_mean_tokens"] = float(data[s].lengths.mean())
    return data, report


def prepare_reader_data(cfg) -> tuple[dict, dict]:
    """Reader rows with passages in the retriever's order (closed book: none)."""
    return pack_splits(cfg, check_and_retrieve(cfg))


def run_reader_job(cfg, runtime: Runtime) -> dict:
    started = time.perf_counter()
    pin_coordinator_threads()
    cfg = _resolve(cfg)
    kill_worker = cfg.fault_injection.startswith("kill-worker")
    spec, fault = graybox_pool_spec(dataclasses.replace(cfg, fault_injection="") if kill_worker else cfg)
    kill_after = parse_fault(cfg.fault_injection) if kill_worker else None
    got = check_and_retrieve(cfg)  # every input check before a worker starts
    out, resuming = prepare_output_dir(cfg, RESULT_NEUTRAL_FIELDS)
    order, reranker = None, None
    if cfg.mode in ("reranker", "white_box"):
        order, reranker = rerank_splits(cfg, got, runtime, out, kill_after)
    data, packing = pack_splits(cfg, got, order)
    if reranker:
        packing["reranker"] = reranker
    pool = runtime.open_pool(spec, fault) if cfg.mode != "white_box" else None
    try:
        torch.manual_seed(cfg.seed)
        if pool is None:  # the white-box reference: the small LM itself learns, in this process
            from transformers import AutoModelForCausalLM

            from raydapt.reader.white_box import WhiteBoxLM, WhiteBoxReader
            lm = AutoModelForCausalLM.from_pretrained(cfg.reranker_model, dtype=torch.float32, use_safetensors=True)
            module = WhiteBoxReader(lm, cfg.prompt_length)
            frozen = WhiteBoxLM(module)
            opt = torch.optim.Adam(module.parameters(), lr=cfg.white_box_lr)
        else:
            frozen, embedding_std = open_frozen_lm(pool, cfg, data["train"])
            module = StaticPrompt(cfg.prompt_length, frozen.oracle.info.embed_dim, embedding_std)
            opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
        step = idpt.restore_checkpoint(out, module, opt) if resuming else 0
        reporter = runtime.trainer_reporter(f"{Path(out).parent.name}/{Path(out).name}")
        idpt.train_prompt_module(cfg, out, frozen, module, opt, data, TASK, step, reporter)
        result = _finish(cfg, out, frozen, module, data, packing, started)
        if hasattr(pool, "fault_report"):
            result["fault_tolerance"] = pool.fault_report()
        result["oracle_usage"] = frozen.oracle.usage.as_dict()
        write_result(out, result)
        return result
    finally:
        if pool is not None:
            runtime.close_pool(pool)


def _finish(cfg, out: Path, frozen, module, data: dict, packing: dict, started: float) -> dict:
    test = idpt.exact_match(frozen, module, data["test"], TASK)["openbook"]
    log = read_jsonl(out / "log.jsonl")
    save_tensors(out / "prompt.safetensors", {"prompt": module.prompt.detach().numpy()},
                 metadata={"method": "reader", "mode": cfg.mode, "model": cfg.model,
                           "prompt_length": str(cfg.prompt_length), "task_dir": cfg.task_dir})
    idpt.plot_curve(out / "curve.png", log, f"frozen reader ({cfg.mode}), seed {cfg.seed}")
    return {"method": "reader", "mode": cfg.mode, "seed": cfg.seed, "test_exact_match": test,
            "dev_exact_match": log[-1]["dev_average"], "final_train_loss": log[-1]["train_loss"],
            "packing": packing, "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "n_train": len(data["train"].lengths), "n_dev": len(data["dev"].lengths),
            "n_test": len(data["test"].lengths), "wall_time_s": time.perf_counter() - started, "config": to_dict(cfg)}
