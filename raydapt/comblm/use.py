"""Using a finished CombLM run: the combined model scores text and generates it.

The large LM is still only reached through the black-box oracle (its full next-token distribution
per position); the expert and the fitted combiner come from the run directory.

    raydapt score --combine runs/comblm --combiner entropy_scalar --input X.jsonl --output Y.parquet
    raydapt generate --run runs/comblm --combiner entropy_scalar --prompt "The with statement"
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydapt.comblm.combiners import load_combiner, mixed_logprobs
from raydapt.config import check, field
from raydapt.errors import UserError
from raydapt.models.heads import token_stats
from raydapt.oracle import ShardedOracle
from raydapt.serving import PoolSpec, Runtime

__all__ = ["CombinedLM", "GenerateConfig", "run_config", "run_generate"]


class CombinedLM:
    """Next-token log-probs of lam * expert + (1 - lam) * large, with lam from a fitted combiner."""

    def __init__(self, run_dir: str | Path, combiner: str, oracle):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        run = Path(run_dir)
        config = run_config(run)
        path = run / "combiners" / f"{combiner}.safetensors"
        if not path.exists():
            fitted = sorted(p.stem for p in (run / "combiners").glob("*.safetensors"))
            raise UserError(f"--combiner {combiner!r} was not fitted in {run}; fitted: {', '.join(fitted)}")
        self.oracle = oracle
        self.tokenizer = AutoTokenizer.from_pretrained(run / "expert")
        self.expert = AutoModelForCausalLM.from_pretrained(run / "expert", dtype=torch.float32, use_safetensors=True).eval()
        self.combiner = _load(path, combiner, oracle.info.vocab_size, config)

    def logprobs(self, ids: np.ndarray) -> torch.Tensor:
        """(B, T-1, V) mixed next-token log-probs for positions 1..T-1 of equal-length rows `ids`."""
        return self.mix(ids, self.oracle.token_logprobs(ids, np.full(len(ids), ids.shape[1]), full=True))

    @torch.no_grad()
    def mix(self, ids: np.ndarray, large) -> torch.Tensor:
        """(B, T-1, V) mixed log-probs, given the oracle's answer `large` (TokenScores with `full`) for
        right-padded rows `ids` (padding does not reach earlier positions: both models are causal)."""
        tokens = torch.from_numpy(ids.astype(np.int64))
        small = token_stats(self.expert(input_ids=tokens).logits.float(), tokens, full=True)
        flat = lambda a: torch.from_numpy(np.ascontiguousarray(a)).reshape(-1, *a.shape[2:])  # noqa: E731
        batch = {"gold": flat(ids[:, 1:].astype(np.int64)), "small_gold": flat(small["logprob"]),
                 "large_gold": flat(large.logprob), "small_entropy": flat(small["entropy"]),
                 "large_entropy": flat(large.entropy), "small_full": flat(small["full"]), "large_full": flat(large.full)}
        mixed = mixed_logprobs(batch, self.combiner(batch))
        return mixed.reshape(len(ids), ids.shape[1] - 1, -1)

    def gold_logprobs(self, ids: np.ndarray, large) -> np.ndarray:
        """(B, T-1) log-prob of each next token of `ids` under the combined model."""
        mixed = self.mix(ids, large)
        gold = torch.from_numpy(ids[:, 1:].astype(np.int64))[..., None]
        return mixed.gather(-1, gold).squeeze(-1).numpy()

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
        """Sample from the combined model, one token at a time (both models see the whole prefix)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("--prompt is empty")
        ids = [self.tokenizer.eos_token_id, *ids]  # documents start after EOS, as in training
        generator = torch.Generator().manual_seed(seed)
        for _ in range(max_new_tokens):
            if len(ids) >= self.oracle.info.max_positions:
                break
            # One dummy position so the last real token's next-token distribution is scored.
            step = self.logprobs(np.array([ids + [0]]))[0, -1]
            token = int(torch.multinomial((step / temperature).softmax(-1), 1, generator=generator)) \
                if temperature > 0 else int(step.argmax())
            if token == self.tokenizer.eos_token_id:
                break
            ids.append(token)
        return self.tokenizer.decode(ids[1:])


def run_config(run: Path) -> dict:
    """The config of a finished CombLM run in `run`."""
    if not (run / "result.json").exists():
        raise UserError(f"--run {run} holds no finished CombLM run (no result.json)")
    return json.loads((run / "result.json").read_text())["config"]


def _load(path: Path, kind: str, vocab_size: int, config: dict):
    from safetensors.torch import load_file
    state = {k: v for k, v in load_file(str(path)).items() if k != "empty"}
    return load_combiner(kind, vocab_size, state, hidden=config["hidden"], layers=config["layers"]).eval()


@dataclass
class GenerateConfig:
    """Sample text from a finished CombLM run's combined model."""
    run: str = field("runs/comblm", "output directory of a finished jobs/comblm.py run")
    combiner: str = field("entropy_scalar", "which fitted combiner mixes the two models")
    prompt: str = field("", "text to continue")
    max_new_tokens: int = field(40, "tokens to sample at most (stops early at end of text)")
    temperature: float = field(0.8, "sampling temperature (0: greedy)")
    seed: int = field(0, "sampling seed")
    local: bool = field(True, "large-LM stages in this process (a Ray pool for one prompt is overkill)")

    def __post_init__(self):
        check(bool(self.prompt), "prompt", "is required")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")


def run_generate(cfg: GenerateConfig, runtime: Runtime) -> str:
    """Sample from the run's combined model, the large LM served by a pool `runtime` opens."""
    run = Path(cfg.run)
    model = run_config(run)["model"]
    pool = runtime.open_pool(PoolSpec(model))
    try:
        combined = CombinedLM(run, cfg.combiner, ShardedOracle(pool, micro_batch_size=1))
        text = combined.generate(cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    finally:
        runtime.close_pool(pool)
    print(text, file=sys.stdout)
    return text
