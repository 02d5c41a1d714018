"""The open-book task's BM25 index (bm25s) vs a brute-force scan of the same corpus, in one run:
queries per second of each, and their agreement (the scan is the reference: same scores), plus the
index's recall@k on the task's questions.

    python bench/retrieval.py [--task-dir DIR] [--scan-queries 64] [--k 100] [--output FILE.json]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from raydapt.data.make_openbook import default_openbook_dir
from raydapt.reader.data import load_questions
from raydapt.reader.retrieval import (BruteForceBM25, build_index, load_corpus_file, load_index, recall_at, retrieve,
                                      save_index, words)
from raydapt.results import bench_output, machine, write_bench

RECALL_K = (1, 5, 20, 100)


def measure(task_dir: Path, scan_queries: int, k: int) -> dict:
    corpus = load_corpus_file(task_dir / "corpus.jsonl")
    splits = {s: load_questions(task_dir / f"{s}.jsonl") for s in ("train", "dev", "test")}
    questions = [q for s in splits.values() for q in s.questions]
    started = time.perf_counter()
    index = build_index(corpus)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as d:
        save_index(index, corpus, d)
        started = time.perf_counter()
        index = load_index(d, corpus)
        load_s = time.perf_counter() - started
    started = time.perf_counter()
    rows, scores = retrieve(index, questions, k)
    index_s = time.perf_counter() - started
    scan = BruteForceBM25([words(t) for t in corpus.texts])
    started = time.perf_counter()
    scanned = [scan.scores(words(q)) for q in questions[:scan_queries]]
    scan_s = time.perf_counter() - started
    # ties: any best passage is right; float32 (index) vs float64 (scan) scores
    top1_same = np.mean([s[r[0]] >= s.max() - 1e-4 for s, r in zip(scanned, rows)])
    score_gap = max(float(np.abs(np.sort(s)[::-1][:k] - sc).max()) for s, sc in zip(scanned, scores))
    row = corpus.row()
    recall = {}
    for name, split in splits.items():
        gold = np.array([row[p] for p in split.passage_ids])
        mine, _ = retrieve(index, split.questions, max(RECALL_K))
        recall[name] = recall_at(mine, gold, RECALL_K)
    return {"passages": len(corpus.ids), "questions": len(questions), "k": k, "scan_queries": len(scanned),
            "build_s": build_s, "load_s": load_s, "index_qps": len(questions) / index_s,
            "scan_qps": len(scanned) / scan_s, "speedup": (len(questions) / index_s) / (len(scanned) / scan_s),
            "top1_agrees_with_scan": float(top1_same), "max_top_k_score_gap": score_gap, "recall": recall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-dir", type=Path, default=default_openbook_dir(), help="open-book task directory")
    parser.add_argument("--scan-queries", type=int, default=64, help="questions timed through the brute-force scan")
    parser.add_argument("--k", type=int, default=100, help="passages retrieved per question")
    parser.add_argument("--output", type=Path, default=bench_output("retrieval"),
                        help="where the figures are written as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.scan_queries, args.k) < 1:
        parser.error("--scan-queries and --k must be >= 1")
    load = os.getloadavg()
    figures = measure(args.task_dir, args.scan_queries, args.k) | {"machine": machine(load)}
    write_bench(args.output, figures)
    return figures


if __name__ == "__main__":
    main()
