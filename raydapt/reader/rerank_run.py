"""Training the re-ranker (through the runtime's Ray Train run) and re-ordering every split's top-N.

The re-ranker reads a question as the reader's frame ("# {question}\\nresult =") and a passage as
the reader sees it; the pairs are joined by the packing separator. Its training groups come from the
train split only; dev and test are re-ranked with the trained weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from raydapt.reader.reranker import PairTokens, Reranker, rerank, training_groups
from raydapt.reader.retrieval import recall_at

__all__ = ["rerank_splits", "reranker_config"]


def _pair_tokens(got, split: str) -> PairTokens:
    t = got.tokens[split]
    return PairTokens(questions=t.frames, passages=t.passages, join=t.separator, pad=t.pad)


def reranker_config(cfg, got, kill_after: int | None) -> dict:
    """The Ray Train loop's config: plain lists and numbers (it travels to the workers)."""
    rows, bm25 = training_groups(got.candidates["train"], got.scores["train"], got.gold["train"], cfg.negatives)
    t = _pair_tokens(got, "train")
    return {"model_dir": cfg.reranker_model, "tokens": {"questions": t.questions, "passages": t.passages,
                                                        "join": t.join, "pad": t.pad},
            "rows": rows.tolist(), "bm25": bm25.tolist(), "seed": cfg.seed, "steps": cfg.reranker_steps,
            "batch": cfg.reranker_batch, "lr": cfg.reranker_lr, "checkpoint_every": cfg.checkpoint_every,
            "threads": 1, "kill_after_steps": kill_after}


def rerank_splits(cfg, got, runtime, out: Path, kill_after: int | None) -> tuple[dict, dict]:
    """(split -> candidates re-ordered by the trained re-ranker, a report)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    trained = runtime.train_reranker(cfg, reranker_config(cfg, got, kill_after), str(Path(out, "reranker").resolve()),
                                     str(Path(out, "fault-injected").resolve()))
    lm = AutoModelForCausalLM.from_pretrained(cfg.reranker_model, dtype=torch.float32, use_safetensors=True)
    model = Reranker(lm)
    model.load_state_dict(trained["state"], strict=False)  # tied embeddings are saved once
    save_model(model, str(Path(out, "reranker.safetensors")))
    order, report = {}, {"losses": trained["losses"], "steps": trained["steps"],
                         "bm25_weight": float(model.bm25_weight.detach()),
                         "worker_failures_injected": int(Path(out, "fault-injected").exists())}
    for s in got.candidates:
        order[s], _ = rerank(model, _pair_tokens(got, s), got.candidates[s], got.scores[s])
        if got.gold[s] is not None:
            report[f"{s}_recall"] = recall_at(order[s], got.gold[s], (1, 5, 20, 100))
    return order, report
