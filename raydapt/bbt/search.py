"""The BBT / BBTv2 coordinator (Sun et al., ICML 2022; EMNLP 2022).

Each generation asks the optimizer for a population, scores all of it on the few-shot train set in
ONE oracle request (the oracle spreads its micro-batches over replicas and stages), and tells the
losses back. API calls are counted as BBT counts them: one candidate on the whole train set. The
best prompt by train loss is scored on dev every `dev_every` calls; the best by dev is kept. After
every generation the whole search state is checkpointed atomically (`checkpoint/`: arrays as
safetensors, the rest as JSON, signed because the optimizer states are pickles; see
raydapt.outputs), so a killed run resumes to exactly the result of an uninterrupted one. The log
is cut back to the rows the checkpoint counts when a run starts, resumed or not. No Ray here: the oracle object is the only way out.

Timing: each log row carries `oracle_s` (seconds inside oracle requests) and `coordinator_s`
(everything else) for the interval since the previous row was written: one generation's ask,
scoring, tell and bookkeeping, plus the previous generation's log write, checkpoint, metrics and
progress line (GDFO: also the wait for its student). The state keeps their totals. Timings are
measurements: they go to the log, the checkpoint and result.json, never into a compared result.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from raydapt.bbt.inputs import EncodedTask, Split
from raydapt.bbt.losses import LOSSES, accuracy
from raydapt.bbt.space import DeepPromptSpace, PromptSpace
from raydapt.errors import UserError
from raydapt.oracle import BlackBoxOracle, Usage
from raydapt.outputs import append_jsonl, load_checkpoint, progress_bar, save_checkpoint, truncate_jsonl
from raydapt.search.optimizers import Optimizer, make_optimizer, restore

__all__ = ["SearchState", "PromptSearch", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoint"  # in the output directory; see raydapt.outputs.save_checkpoint


@dataclass
class SearchState:
    """Everything a resumed search needs; checkpointed after every generation (arrays, bytes, JSON)."""
    generation: int = 0
    api_calls: int = 0
    optimizers: list[bytes] = field(default_factory=list)
    layer_best: np.ndarray | None = None     # BBTv2: the best z of every layer, (n_layers, d)
    best_train_loss: float = float("inf")
    best_train_z: np.ndarray | None = None   # BBT: (d,); BBTv2: (n_layers, d)
    best_dev_accuracy: float = -1.0
    best_dev_loss: float = float("inf")
    best_z: np.ndarray | None = None         # the best prompt by dev
    dev_scored_at: int = 0
    log_rows: int = 0
    elapsed_s: float = 0.0
    oracle_usage: dict | None = None         # what the oracle has served, across resumes
    oracle_s: float = 0.0                    # seconds inside oracle requests (sum of the log's oracle_s)
    coordinator_s: float = 0.0               # seconds in the loop outside them (sum of coordinator_s)


class PromptSearch:
    """Runs BBT (one prompt at the input) or BBTv2 (a prompt per layer, layer by layer)."""

    def __init__(self, cfg, oracle: BlackBoxOracle, data: EncodedTask, space: PromptSpace | DeepPromptSpace,
                 out_dir: Path, progress: Callable[[str], None] = tqdm.write, reporter=None):
        self.cfg, self.oracle, self.data, self.space = cfg, oracle, data, space
        self.out_dir, self.progress = Path(out_dir), progress
        self.reporter = reporter  # optional: .generation(row) after every generation (metrics)
        self.loss_fn = LOSSES[cfg.loss]
        self.deep = cfg.method == "bbtv2"
        self.n_layers = space.n_layers if self.deep else 1
        self.optimizers: list[Optimizer] = []
        self.oracle_seconds = 0.0  # wall time inside self.score's oracle requests, since construction

    # --- prompts -----------------------------------------------------------------------------
    def prompts(self, z: np.ndarray, layer: int = 0, fixed: np.ndarray | None = None) -> np.ndarray:
        """z (P, d) -> (P, L, D) for BBT; for BBTv2 layer `layer` takes z, the others `fixed`."""
        if self.deep:
            return self.space.population(layer, z, fixed)
        return self.space.project(z)

    def full_prompt(self, z: np.ndarray) -> np.ndarray:
        """One searched z (BBT: (d,); BBTv2: (n_layers, d)) -> a batch of one prompt."""
        return self.space.assemble(z)[None] if self.deep else self.space.project(z[None])

    def score(self, split: Split, prompts: np.ndarray | None) -> np.ndarray:
        mode = "deep" if self.deep else self.cfg.mode
        began = time.perf_counter()
        try:
            return self.oracle.label_logits(split.input_ids, split.lengths, self.data.label_ids, prompts, mode,
                                            self.data.prompt_offset)
        finally:
            self.oracle_seconds += time.perf_counter() - began

    # --- state -------------------------------------------------------------------------------
    def fresh_state(self) -> SearchState:
        cfg = self.cfg
        evaluations = max(1, cfg.budget // self.n_layers)  # BBTv2: the budget is shared by the layers
        self.optimizers = [make_optimizer(cfg.optimizer, cfg.intrinsic_dim, cfg.popsize, evaluations,
                                          seed=cfg.seed * 1009 + layer, sigma=cfg.sigma, bound=cfg.bound)
                           for layer in range(self.n_layers)]
        layer_best = np.zeros((self.n_layers, cfg.intrinsic_dim), np.float64) if self.deep else None
        return SearchState(layer_best=layer_best)

    def checkpoint(self, state: SearchState) -> None:
        state.optimizers = [opt.state_bytes() for opt in self.optimizers]
        state.oracle_usage = self.oracle.usage.as_dict()
        save_checkpoint(self.out_dir / CHECKPOINT_DIR,
                        {f.name: getattr(state, f.name) for f in dataclasses.fields(state)})

    def resume(self) -> SearchState:
        saved = load_checkpoint(self.out_dir / CHECKPOINT_DIR)  # checks the signature, or refuses
        state = self.fresh_state()  # the same state class (GDFO's has more fields), then overwritten
        names = {f.name for f in dataclasses.fields(state)}
        if set(saved) != names:
            raise UserError(f"--resume: {self.out_dir / CHECKPOINT_DIR} holds the state of another method "
                            f"(fields {sorted(set(saved) ^ names)} differ)")
        state = dataclasses.replace(state, **saved)
        # Signed by this installation (load_checkpoint verified it): only then are the pickles read.
        self.optimizers = [restore(data) for data in state.optimizers]
        if state.oracle_usage is not None:  # a resumed run reports what the whole run was served
            self.oracle.usage = Usage(**state.oracle_usage)
        return state

    # --- the loop ----------------------------------------------------------------------------
    def step(self, state: SearchState) -> dict:
        """One generation: ask, score the population in one request, tell."""
        layer = state.generation % self.n_layers
        opt = self.optimizers[layer]
        z = np.asarray(opt.ask(), dtype=np.float64)                   # (P, d)
        logits = self.score(self.data.train, self.prompts(z, layer, state.layer_best))
        losses = self.loss_fn(logits, self.data.train.labels)         # (P,)
        opt.tell(z, losses)
        state.api_calls += len(z)
        state.generation += 1
        best = int(np.argmin(losses))
        if self.deep:
            state.layer_best[layer] = opt.best()[0]
        if losses[best] < state.best_train_loss:
            state.best_train_loss = float(losses[best])
            state.best_train_z = (state.layer_best.copy() if self.deep else z[best].copy())
            if self.deep:
                state.best_train_z[layer] = z[best]
        return {"generation": state.generation, "layer": layer, "api_calls": state.api_calls,
                "population_mean_loss": float(np.mean(losses)), "population_best_loss": float(losses[best]),
                "best_train_loss": state.best_train_loss,
                "train_accuracy_of_best": float(accuracy(logits[best], self.data.train.labels))}

    def score_dev(self, state: SearchState) -> dict:
        logits = self.score(self.data.dev, self.full_prompt(state.best_train_z))[0]
        acc = float(accuracy(logits, self.data.dev.labels))
        loss = float(self.loss_fn(logits, self.data.dev.labels))
        if (acc, -loss) > (state.best_dev_accuracy, -state.best_dev_loss):
            state.best_dev_accuracy, state.best_dev_loss = acc, loss
            state.best_z = state.best_train_z.copy()
        state.dev_scored_at = state.api_calls
        return {"dev_accuracy": acc, "dev_loss": loss, "best_dev_accuracy": state.best_dev_accuracy}

    def generation_calls(self, state: SearchState) -> int:
        """API calls the next generation takes at least."""
        return self.cfg.popsize

    def run(self, state: SearchState) -> SearchState:
        with progress_bar(self.cfg.budget, state.api_calls, self.out_dir.name) as bar:  # an ETA over API calls
            return self._run(state, bar)

    def _run(self, state: SearchState, bar) -> SearchState:
        cfg = self.cfg
        log_path = self.out_dir / "log.jsonl"
        # Rows the checkpoint does not count (a kill after a row, before its checkpoint, even the
        # first) and a line torn mid-write are redone; a fresh run counts none.
        truncate_jsonl(log_path, state.log_rows)
        started = time.perf_counter() - state.elapsed_s
        mark, oracle_mark = time.perf_counter(), self.oracle_seconds  # then: the previous row's write
        while state.api_calls + self.generation_calls(state) <= cfg.budget:
            row = self.step(state)
            last = state.api_calls + self.generation_calls(state) > cfg.budget
            if state.api_calls // cfg.dev_every > state.dev_scored_at // cfg.dev_every or last:
                row |= self.score_dev(state)
            now = time.perf_counter()
            state.elapsed_s = now - started
            row["elapsed_s"] = round(state.elapsed_s, 3)
            oracle_s = self.oracle_seconds - oracle_mark
            coordinator_s = max(0.0, now - mark - oracle_s)
            state.oracle_s += oracle_s
            state.coordinator_s += coordinator_s
            row["oracle_s"], row["coordinator_s"] = round(oracle_s, 6), round(coordinator_s, 6)
            mark, oracle_mark = now, self.oracle_seconds
            append_jsonl(log_path, row)
            state.log_rows += 1
            self.checkpoint(state)
            if self.reporter is not None:
                self.reporter.generation(row | {"best_dev_accuracy": state.best_dev_accuracy})
            if state.generation % cfg.log_every == 0 or last:
                self.progress(self._summary_line(state, row))
            bar.update(state.api_calls - bar.n)
            bar.set_postfix(best_train_loss=f"{state.best_train_loss:.4f}",
                            best_dev_acc=f"{state.best_dev_accuracy:.3f}", refresh=False)
        return state

    def _summary_line(self, state: SearchState, row: dict) -> str:
        dev = f" | dev acc {row['dev_accuracy']:.3f} (best {state.best_dev_accuracy:.3f})" if "dev_accuracy" in row else ""
        return (f"gen {state.generation:4d} | calls {state.api_calls:5d}/{self.cfg.budget} | "
                f"best train loss {state.best_train_loss:.4f}{dev}")
