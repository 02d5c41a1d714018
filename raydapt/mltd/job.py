"""An MLtD run from its config to its output directory.

Every input is checked and every domain built before the output directory exists (a domain too small
for one inner batch, a rank that does not fit a layer, an unknown held-out domain all stop here). The
meta-learning methods then meta-train on Ray Train workers (`Runtime.meta_train_mltd`); every method
is scored in this process: on each held-out domain, its adapted parameters are fitted for
`adapt_steps` steps on the domain's train split and the test perplexity is measured.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from raydapt.bbt.job import prepare_output_dir
from raydapt.config import to_dict
from raydapt.data.make_domains import all_domain_names, build_domains, held_out_names
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.mltd.adapt import adapted_parameters, build_model, score_domain, trainable_share
from raydapt.mltd.config import META_METHODS, RESULT_NEUTRAL_FIELDS
from raydapt.models.checkpoint import load_tokenizer, model_info
from raydapt.outputs import append_jsonl, read_json, save_tensors, write_atomic, write_result

__all__ = ["run_mltd_job", "check_domains", "WEIGHTS_FILE"]

WEIGHTS_FILE = "mltd.safetensors"


def check_domains(meta_train, meta_test, cfg):
    """The held-out domains to score (all, or --meta-test-domains); UserError for an unknown one or
    for any domain with fewer training sequences than one inner batch."""
    held = {d.name: d for d in meta_test}
    unknown = [n for n in cfg.domains if n not in held]
    if unknown:
        raise UserError(f"--meta-test-domains: {unknown[0]!r} is not a held-out domain; held out: {', '.join(held)}")
    chosen = [held[n] for n in cfg.domains] if cfg.domains else meta_test
    for d in (meta_train if cfg.method in META_METHODS else []) + chosen:
        if len(d.train) < cfg.inner_batch or len(d.test) < 1:
            raise UserError(f"domain {d.name}: {len(d.train)} training sequences of {cfg.context} tokens "
                            f"({len(d.test)} test), fewer than one inner batch (--inner-batch {cfg.inner_batch}); "
                            "give it more text or lower --inner-batch / --context")
    return chosen


def _wanted(cfg):
    """Which domains a run reads: the meta-train ones only for meta-learning; the held-out ones of
    --meta-test-domains (all by default). An unknown --meta-test-domains name stops here, unread."""
    held = [n for names in all_domain_names(cfg.domains_dir).values() for n in held_out_names(names)]
    unknown = [n for n in cfg.domains if n not in held]
    if unknown:
        raise UserError(f"--meta-test-domains: {unknown[0]!r} is not a held-out domain; held out: {', '.join(held)}")
    chosen = set(cfg.domains or held)
    return lambda name, is_held: name in chosen if is_held else cfg.method in META_METHODS


def run_mltd_job(cfg, make_runtime) -> dict:
    """Run one method; `make_runtime()` gives the Ray side, called once every input has been checked."""
    started = time.perf_counter()
    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")))
    info = model_info(cfg.model)
    if cfg.context > info.max_positions:
        raise UserError(f"--context {cfg.context} exceeds the model's context of {info.max_positions}")
    model = build_model(cfg.model, cfg, cfg.seed)  # a rank too large for a layer stops here, in a second
    share = trainable_share(model, cfg.method)
    meta_train, meta_test = build_domains(load_tokenizer(cfg.model), cfg.context, cfg.train_sequences,
                                          cfg.test_sequences, cfg.domains_dir, cfg.meta_train_sequences,
                                          wanted=_wanted(cfg))
    scored = check_domains(meta_train, meta_test, cfg)
    out, _ = prepare_output_dir(cfg, RESULT_NEUTRAL_FIELDS, marker="no-signed-checkpoint-here")
    if cfg.resume and (out / "result.json").exists():
        return read_json(out / "result.json")  # a finished run is kept as it is
    history, steps, killed = [], 0, False
    if cfg.method in META_METHODS:
        runtime = make_runtime()
        runtime.start(math.ceil(cfg.workers * cfg.cpus_per_worker), dashboard=True)
        storage = cfg.storage_path or str((out / "train").resolve())
        marker = out / "fault-injected"
        tasks = [(d.name, d.train, d.test) for d in meta_train]
        run = runtime.meta_train_mltd(cfg, to_dict(cfg), tasks, storage, str(marker.resolve()))
        try:
            _load_outer(model, Path(run["checkpoint"]) / WEIGHTS_FILE, out / WEIGHTS_FILE, cfg)
        finally:
            shutil.rmtree(run["checkpoint"], ignore_errors=True)
        history, steps, killed = run["history"], run["steps"], marker.exists()
    return _score_and_write(cfg, out, model, scored, meta_train, history, steps, killed, share, started)


def _load_outer(model, checkpoint: Path, keep: Path, cfg) -> None:
    from safetensors.torch import load_file

    from raydapt.adapters import load_trainable

    tensors = load_file(str(checkpoint))
    load_trainable(model, tensors)
    save_tensors(keep, {k: v.numpy() for k, v in tensors.items()},
                 metadata={"method": cfg.method, "model": str(Path(cfg.model).resolve()), "seed": str(cfg.seed),
                           "tarp": cfg.tarp_config().to_json(), "tams": cfg.tams_config().to_json()})


def _score_and_write(cfg, out: Path, model, scored, meta_train, history, steps, killed, share, started) -> dict:
    log = out / "log.jsonl"
    write_atomic(log, b"")
    for row in history:
        append_jsonl(log, {"phase": "meta", **row})
    scores = {}
    for index, domain in enumerate(scored):
        result = score_domain(model, cfg, torch.from_numpy(domain.train), torch.from_numpy(domain.test), index)
        scores[domain.name] = result["perplexity"]
        append_jsonl(log, {"phase": "adapt", "domain": domain.name, "losses": result["adapt_losses"],
                           "perplexity": result["perplexity"], "tams_choice": result["tams_choice"]})
    _plot(out / "perplexity.png", scores, f"{cfg.method}, seed {cfg.seed}")
    result = {
        "method": cfg.method, "seed": cfg.seed, "tarp": cfg.tarp, "rank": cfg.rank,
        "perplexity": scores, "mean_perplexity": float(np.mean(list(scores.values()))),
        "trainable_share": share, "adapted_parameters": sum(p.numel() for p in adapted_parameters(model, cfg.method)),
        "meta_steps": steps, "first_outer_loss": history[0]["outer_loss"] if history else None,
        "final_outer_loss": history[-1]["outer_loss"] if history else None,
        "worker_failures_injected": int(killed),
        "domains": {"meta_train": {d.name: [len(d.train), len(d.test)] for d in meta_train},
                    "meta_test": {d.name: [len(d.train), len(d.test)] for d in scored},
                    "sources": {d.name: d.source for d in list(meta_train) + list(scored)}},
        "held_out_rule": "per kind, the first quarter (>= 1) of the domain names by SHA-256 (raydapt.data.make_domains)",
        "wall_time_s": time.perf_counter() - started, "config": to_dict(cfg),
    }
    write_result(out, result)
    return result


def _plot(path: Path, scores: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(scores)
    ax.bar(range(len(names)), [scores[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
