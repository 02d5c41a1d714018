"""A CombLM run from its config to its output directory.

Phases, each skipped on --resume when its output exists:
  data/*.parquet                 the splits (raydapt.comblm.domains)
  expert/                        the fine-tuned expert (Ray Train), an HF checkpoint directory
  cache/{large,untuned,expert}-{split}.safetensors   per-token outputs of each model
  combiners/{name}.safetensors   each fitted combiner (one Ray Train run splits them over its
                                 workers); fitted.json: their test
                                 NLLs and losses, written last
  result.json, perplexity.png    written last: a directory with result.json holds a finished run
The expert's fine-tuning (a thread driving Ray Train) runs while the large LM scores the fit and
test sets through the oracle; `timeline` in result.json records when each phase ran.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from raydapt.bbt.job import prepare_output_dir
from raydapt.comblm.cache import as_batch, cache_bytes, load_cache, save_cache, score_in_process, score_with_oracle
from raydapt.comblm.combiners import max_prob_oracle_nll, proxy_tuning_nll, single_nll
from raydapt.comblm.config import RESULT_NEUTRAL_FIELDS
from raydapt.comblm.domains import build_splits, load_split, save_split
from raydapt.config import to_dict
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.models.checkpoint import HF_FILES, model_info
from raydapt.oracle import ShardedOracle
from raydapt.outputs import read_json, save_tensors, write_json, write_result
from raydapt.serving import PoolSpec, Runtime

__all__ = ["run_comblm_job", "check_tokenizers", "Timeline"]

SPLITS = ("expert_train", "target_fit", "target_test", "general_fit", "general_test", "fit")
SCORED = ("fit", "target_test", "general_test")     # what every model scores
TESTS = {"target_test": "perplexity", "general_test": "general_perplexity"}


class Timeline:
    """When each phase ran (seconds since the job started), printed as it goes."""

    def __init__(self):
        self.t0, self.phases, self._lock = time.perf_counter(), {}, threading.Lock()
        self.t0_wall = time.time()  # Ray tasks report wall-clock times

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 2)

    def start(self, name: str, detail: str = "") -> None:
        with self._lock:
            self.phases[name] = [self.now(), None]
            print(f"[{self.now():7.1f}s] {name}: started {detail}".rstrip(), file=sys.stderr, flush=True)

    def end(self, name: str, detail: str = "") -> None:
        with self._lock:
            self.phases[name][1] = self.now()
            print(f"[{self.now():7.1f}s] {name}: done {detail}".rstrip(), file=sys.stderr, flush=True)

    def summary(self, wall: float) -> dict:
        """Phase spans and how much running them at once saved: the sum of the parts (each combiner's
        fit counted on its own, not the envelope around them) against the wall time."""
        spans = {k: v for k, v in self.phases.items() if v[1] is not None}
        total = sum(b - a for k, (a, b) in spans.items() if k != "combiner_fitting")
        return {"phases": spans, "sum_of_phases_s": round(total, 2), "wall_time_s": round(wall, 2),
                "speedup_from_overlap": round(total / wall, 3) if wall else None}


def check_tokenizers(large_dir: str, expert_dir: str):
    """Both models must share one tokenizer: CombLM mixes distributions over one vocabulary."""
    from transformers import AutoTokenizer

    toks = {}
    for flag, path in (("model", large_dir), ("expert", expert_dir)):
        try:
            toks[flag] = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"--{flag} {path} has no usable tokenizer ({str(e).splitlines()[0]})")
    large, expert = toks["model"].get_vocab(), toks["expert"].get_vocab()
    if large != expert:
        differ = sum(1 for t, i in expert.items() if large.get(t) != i)
        raise UserError(f"--expert {expert_dir} has a different tokenizer from --model {large_dir} "
                        f"({len(expert)} vs {len(large)} tokens, {differ} map to different ids); "
                        "CombLM mixes next-token distributions, so both must share one vocabulary")
    return toks["model"]


def _saved_splits(cfg) -> dict[str, np.ndarray] | None:
    """The splits a resumed run wrote before, or None."""
    data = Path(cfg.output_dir) / "data"
    if cfg.resume and all((data / f"{s}.parquet").exists() for s in SPLITS):
        return {s: load_split(data / f"{s}.parquet") for s in SPLITS}
    return None


def _save_splits(out: Path, splits: dict[str, np.ndarray]) -> None:
    (out / "data").mkdir(exist_ok=True)
    for name, blocks in splits.items():
        save_split(out / "data" / f"{name}.parquet", blocks)


def _check_cache_size(cfg, splits, vocab_size: int) -> int:
    tokens = sum(splits[s].size - len(splits[s]) for s in SCORED)
    needed = 3 * cache_bytes(tokens, vocab_size, full=True)  # large, expert, untuned small
    if needed > cfg.max_cache_gb * 1e9:
        raise UserError(f"--max-cache-gb {cfg.max_cache_gb}: the full distributions of 3 models on "
                        f"{tokens} tokens take {needed / 1e9:.2f} GB; lower --fit-tokens/--test-tokens "
                        "or raise the limit")
    return needed


def _cached(path: Path, compute) -> dict[str, np.ndarray]:
    if path.exists():
        return load_cache(path)
    arrays = compute()
    save_cache(path, arrays)
    return arrays


def _storage(cfg, out: Path) -> str:
    return cfg.storage_path or str((out / "train").resolve())


def _train_expert(cfg, runtime: Runtime, out: Path, splits, timeline: Timeline, report: dict) -> None:
    """Ray Train fine-tuning into out/expert (kept when it is already there)."""
    expert = out / "expert"
    if (expert / "config.json").exists():
        return
    timeline.start("expert_fine_tuning", f"({cfg.workers} Ray Train workers, {cfg.expert_steps} steps)")
    storage = _storage(cfg, out)
    marker = str((out / "fault-injected").resolve())
    run = runtime.fine_tune_expert(cfg, splits["expert_train"], cfg.expert, storage, marker)
    tmp = out / ".expert.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in HF_FILES:
        if Path(run["checkpoint"], name).exists():
            shutil.copy(Path(run["checkpoint"], name), tmp)
    shutil.rmtree(run["checkpoint"], ignore_errors=True)
    write_json(tmp / "train_losses.json", run["losses"])
    tmp.rename(expert)  # complete before it has its final name
    report["worker_failures_injected"] = int(Path(marker).exists())
    timeline.end("expert_fine_tuning", f"(final loss {run['losses'][-1]:.4f})")


def _score_large(cfg, runtime: Runtime, out: Path, splits, timeline: Timeline) -> dict[str, dict]:
    """The black-box LM's answers on the fit and test sets, through the sharded oracle."""
    paths = {s: out / "cache" / f"large-{s}.safetensors" for s in SCORED}
    if all(p.exists() for p in paths.values()):
        return {s: load_cache(p) for s, p in paths.items()}
    timeline.start("large_lm_scoring", f"({cfg.replicas} replica(s) x {cfg.stages} stage(s))")
    spec = PoolSpec(cfg.model, cfg.stages, cfg.replicas, cfg.cpus_per_stage, cfg.gpus_per_stage)
    pool = runtime.open_pool(spec)
    try:
        oracle = ShardedOracle(pool, cfg.micro_batch)
        caches = {s: _cached(p, lambda s=s: score_with_oracle(oracle, splits[s], full=True)) for s, p in paths.items()}
    finally:
        runtime.close_pool(pool)
    timeline.end("large_lm_scoring", f"({oracle.usage.tokens} tokens)")
    return caches


def _score_small(name: str, model_dir, out: Path, splits, timeline: Timeline) -> dict[str, dict]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    paths = {s: out / "cache" / f"{name}-{s}.safetensors" for s in SCORED}
    if all(p.exists() for p in paths.values()):
        return {s: load_cache(p) for s, p in paths.items()}
    timeline.start(f"{name}_scoring")
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    caches = {s: _cached(p, lambda s=s: score_in_process(model, splits[s], full=True)) for s, p in paths.items()}
    timeline.end(f"{name}_scoring")
    return caches


def _fit_combiners(cfg, runtime: Runtime, out: Path, caches: dict, vocab_size: int, timeline: Timeline
                   ) -> dict[str, dict]:
    jobs = [(k, k, "expert") for k in cfg.kinds("combiners")] + \
           [(f"{k}+untuned", k, "untuned") for k in cfg.kinds("control")]
    fits = {small: as_batch(caches[small]["fit"], caches["large"]["fit"]) for small in ("expert", "untuned")}
    tests = {small: {s: as_batch(caches[small][s], caches["large"][s]) for s in TESTS} for small in fits}
    options = {"vocab_size": vocab_size, "seed": cfg.seed, "hidden": cfg.hidden, "layers": cfg.layers,
               "batch_tokens": cfg.combiner_batch, "epochs": cfg.combiner_epochs}
    summary = out / "combiners" / "fitted.json"
    if summary.exists():  # a resumed run whose combiners were all fitted: keep them
        fitted = read_json(summary)
        if sorted(fitted) == sorted(name for name, _, _ in jobs):
            return fitted
    workers = min(cfg.combiner_workers, len(jobs))
    timeline.start("combiner_fitting", f"({len(jobs)} combiners on {workers} Ray Train workers)")
    fitted = runtime.fit_combiners(jobs, fits, tests, options, workers, _storage(cfg, out))
    (out / "combiners").mkdir(exist_ok=True)
    for name, res in fitted.items():
        save_tensors(out / "combiners" / f"{name}.safetensors", res.pop("state") or {"empty": np.zeros(0, np.float32)},
                     metadata={"kind": res["kind"], "hidden": cfg.hidden, "layers": cfg.layers})
    write_json(summary, fitted)  # last: its presence means every combiner above is complete
    timeline.end("combiner_fitting")
    for name, res in fitted.items():  # each task's own span, to show they overlapped
        timeline.phases[f"fit:{name}"] = [round(res["began"] - timeline.t0_wall, 2),
                                                 round(res["ended"] - timeline.t0_wall, 2)]
    return fitted


def _perplexities(cfg, caches: dict, fitted: dict) -> dict[str, dict]:
    """Test perplexity of every model and combiner on each test split."""
    out = {}
    for split, key in TESTS.items():
        large, expert, untuned = caches["large"][split], caches["expert"][split], caches["untuned"][split]
        both = as_batch(expert, large)
        nll = {"large": single_nll(both, "large"), "expert": single_nll(both, "small"),
               "expert_untuned": single_nll(as_batch(untuned, large), "small"),
               "proxy_tuning": proxy_tuning_nll(large["full"], expert["full"], untuned["full"], large["gold"],
                                                alpha=cfg.proxy_alpha),
               "max_prob_oracle": max_prob_oracle_nll(both)}
        nll |= {name: res["nll"][split] for name, res in fitted.items()}
        out[key] = {name: round(math.exp(v), 4) for name, v in nll.items()}
    return out


def _gains(ppl: dict, kinds: list[str]) -> dict:
    """Relative perplexity gain of each combiner over the better single model (the paper's headline)."""
    best_single = min(ppl["large"], ppl["expert"])
    gains = {k: round(1 - ppl[k] / best_single, 4) for k in kinds if k in ppl}
    best = min(gains, key=lambda k: -gains[k])
    return {"best_single_model": "large" if ppl["large"] <= ppl["expert"] else "expert",
            "relative_gain": gains, "best_combiner": best, "best_combiner_gain": gains[best]}


def plot_perplexities(path: Path, ppl: dict, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ppl["perplexity"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(x - 0.2, [ppl["perplexity"][n] for n in names], 0.4, label="target test")
    ax.bar(x + 0.2, [ppl["general_perplexity"][n] for n in names], 0.4, label="general test")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_comblm_job(cfg, runtime: Runtime) -> dict:
    """Run (or resume) CombLM end to end on `runtime` (Ray Train and tasks: `actors.runner.RayRuntime`)
    and return result.json's content."""
    timeline = Timeline()
    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir("large")),
                              expert=cfg.expert or str(default_model_dir("small")))
    # Every input check before anything starts.
    tokenizer = check_tokenizers(cfg.model, cfg.expert)
    info = model_info(cfg.model)
    context = min(info.max_positions, model_info(cfg.expert).max_positions)
    if cfg.block > context:
        raise UserError(f"--block {cfg.block} exceeds the models' context of {context} tokens")
    PoolSpec(cfg.model, cfg.stages, cfg.replicas, cfg.cpus_per_stage, cfg.gpus_per_stage).validate()
    saved = _saved_splits(cfg)
    splits = saved or build_splits(cfg, tokenizer)  # bad text fails here, before the output dir exists
    cache_size = _check_cache_size(cfg, splits, info.vocab_size)
    out, _ = prepare_output_dir(cfg, RESULT_NEUTRAL_FIELDS)
    if saved is None:
        _save_splits(out, splits)
    (out / "cache").mkdir(exist_ok=True)
    cpus = math.ceil(cfg.workers * cfg.cpus_per_worker + cfg.replicas * cfg.stages * cfg.cpus_per_stage)
    runtime.start(cpus, dashboard=True)  # Ray Train's state queries need the dashboard

    report: dict = {}
    with ThreadPoolExecutor(1) as pool:  # Ray Train fine-tunes while this thread has the oracle score
        trainer = pool.submit(_train_expert, cfg, runtime, out, splits, timeline, report)
        caches = {"large": _score_large(cfg, runtime, out, splits, timeline)}
        caches["untuned"] = _score_small("untuned", cfg.expert, out, splits, timeline)
        trainer.result()  # re-raises what fine-tuning raised
    caches["expert"] = _score_small("expert", out / "expert", out, splits, timeline)
    fitted = _fit_combiners(cfg, runtime, out, caches, info.vocab_size, timeline)

    ppl = _perplexities(cfg, caches, fitted)
    kinds = cfg.kinds("combiners")
    learned = [k for k in kinds if k != "mean"]
    target, general = ppl["perplexity"], ppl["general_perplexity"]
    wall = timeline.now()
    result = {
        "method": "comblm", "seed": cfg.seed, "fit_mix": cfg.fit_mix, **ppl,
        "gain": _gains(target, kinds), "general_gain": _gains(general, kinds),
        "learned_combiners_beat_both_models": all(target[k] < min(target["large"], target["expert"]) for k in learned),
        "control": {k: target[f"{k}+untuned"] for k in cfg.kinds("control")},
        "tokens": {s: int(splits[s].size - len(splits[s])) for s in SPLITS},
        "expert_final_train_loss": _final_loss(out), "cache_bytes": cache_size,
        "combiner_fit_losses": {n: (r["losses"][-1] if r["losses"] else None) for n, r in fitted.items()},
        "timeline": timeline.summary(wall), "wall_time_s": wall, "config": to_dict(cfg), **report,
    }
    plot_perplexities(out / "perplexity.png", ppl, f"CombLM, seed {cfg.seed}, fit mix {cfg.fit_mix}")
    write_result(out, result)
    return result


def _final_loss(out: Path) -> float:
    return read_json(out / "expert" / "train_losses.json")[-1]
