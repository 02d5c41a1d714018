"""The token blocks of an extension run: new-language train/dev/test, the original-domain mix (its
own train and held-out blocks), and the original-domain evaluation source, plus the batch plan.

Each source's texts are tokenized with an end token after each, concatenated and cut into blocks of
`context` tokens; only as many blocks as the run can use are tokenized. Batch t is a function of
(seed, t) only: a block is original-domain with probability p, then drawn uniformly from its source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raydapt.data import make_newlang as recipe
from raydapt.errors import UserError

__all__ = ["ExtendData", "read_corpora", "build_data", "blocks_of", "step_rows", "EVAL_SETS"]

EVAL_SETS = ("new_dev", "new_test", "original_mix", "original_eval")


@dataclass
class ExtendData:
    train: np.ndarray             # (N, T) int64: new-language blocks, then original-mix blocks
    train_original: np.ndarray    # (N,) bool
    eval: dict[str, np.ndarray]   # EVAL_SETS -> (n, T)
    stats: dict = field(default_factory=dict)


def blocks_of(texts: list[str], tokenizer, context: int, max_blocks: int, flag: str) -> np.ndarray:
    """Up to `max_blocks` blocks (n, context) of the concatenated, end-token-separated texts."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = max_blocks * context
    for start in range(0, len(texts), 256):
        for row in tokenizer(texts[start:start + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            ids += row + ([eos] if eos is not None else [])
        if len(ids) >= need:
            break
    n = min(max_blocks, len(ids) // context)
    if n == 0:
        raise UserError(f"--{flag}: {len(ids)} tokens, not one block of --context {context}")
    return np.asarray(ids[:n * context], dtype=np.int64).reshape(n, context)


def _mix_split(texts: list[str]) -> tuple[list[str], list[str]]:
    """Original-mix texts for training and for its own held-out loss (the recipe's hash split)."""
    train = [t for t in texts if recipe.split_of(t) == "train"]
    held = [t for t in texts if recipe.split_of(t) != "train"]
    if not train or not held:  # a handful of texts: split by position instead
        cut = max(1, len(texts) // 10)
        return texts[cut:] or texts, texts[:cut]
    return train, held


def read_corpora(cfg) -> dict:
    """The texts of the three sources, or a UserError naming the corpus flag that is missing or empty.
    The user's files first (quick to read), then the recipe's defaults (seconds)."""
    mix = recipe.read_user_texts(cfg.original_mix, "original-mix") if cfg.original_mix else None
    held_eval = recipe.read_user_texts(cfg.original_eval, "original-eval") if cfg.original_eval else None
    if cfg.new_domain:
        new = recipe.user_new_language(cfg.new_domain)
        if not new.splits["dev"] or not new.splits["test"]:  # too few texts for the hash split
            texts = new.splits["train"] + new.splits["dev"] + new.splits["test"]
            cut = max(1, len(texts) // 20)
            new.splits = {"train": texts[2 * cut:] or texts, "dev": texts[:cut], "test": texts[cut:2 * cut] or texts[:cut]}
    else:
        new = recipe.new_language_corpus(cfg.language, cfg.locale_dir)
    return {"new": new, "mix": mix or recipe.original_mix_texts(),
            "eval": held_eval or recipe.original_eval_texts()}


def build_data(cfg, tokenizer, corpora: dict | None = None) -> ExtendData:
    """Every block the run needs (`corpora` from `read_corpora`, read here when not given)."""
    corpora = corpora or read_corpora(cfg)
    new, mix, held_eval = corpora["new"], corpora["mix"], corpora["eval"]
    mix_train, mix_held = _mix_split(mix)
    rows = cfg.steps * cfg.batch
    n_orig = int(np.ceil(rows * cfg.original_fraction * 1.5)) + 1 if cfg.original_fraction > 0 else 0
    new_train = blocks_of(new.splits["train"], tokenizer, cfg.context, rows, "new-domain")
    orig_train = blocks_of(mix_train, tokenizer, cfg.context, n_orig, "original-mix") if n_orig else \
        np.zeros((0, cfg.context), np.int64)
    k = cfg.eval_blocks
    evals = {"new_dev": blocks_of(new.splits["dev"], tokenizer, cfg.context, k, "new-domain"),
             "new_test": blocks_of(new.splits["test"], tokenizer, cfg.context, k, "new-domain"),
             "original_mix": blocks_of(mix_held, tokenizer, cfg.context, k, "original-mix"),
             "original_eval": blocks_of(held_eval, tokenizer, cfg.context, k, "original-eval")}
    train = np.concatenate([new_train, orig_train])
    original = np.concatenate([np.zeros(len(new_train), bool), np.ones(len(orig_train), bool)])
    stats = {"new_domain": new.stats(), "train_blocks_new": len(new_train), "train_blocks_original": len(orig_train),
             **{f"{name}_blocks": len(b) for name, b in evals.items()}}
    return ExtendData(train, original, evals, stats)


def step_rows(original: np.ndarray, batch: int, steps: int, fraction: float, seed: int) -> np.ndarray:
    """(steps, batch) indices into the train blocks; row t depends on (seed, t) only."""
    new_idx, orig_idx = np.flatnonzero(~original), np.flatnonzero(original)
    plan = np.empty((steps, batch), np.int64)
    for t in range(steps):
        rng = np.random.default_rng([seed, t])
        pick_orig = (rng.random(batch) < fraction) & (len(orig_idx) > 0)
        plan[t] = np.where(pick_orig, orig_idx[rng.integers(0, max(1, len(orig_idx)), batch)],
                           new_idx[rng.integers(0, len(new_idx), batch)])
    return plan
