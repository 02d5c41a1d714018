"""Build raydapt's default tokenizer, "large" and "small" LMs from the standard library's source.

No model hub is reachable on the machines raydapt targets, so it trains its own frozen "large" LM
(a 4-layer Llama, splittable into up to 4 pipeline stages) and a >= 20x smaller expert/student LM
that shares its tokenizer. Everything derives from one seed: the same seed on the same machine
gives byte-identical safetensors. Entry point: `python jobs/pretrain.py`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raydapt.config import check, field, to_dict
from raydapt.data.corpus import load_corpus
from raydapt.defaults import raydapt_home
from raydapt.errors import UserError

__all__ = ["PretrainConfig", "QUICK", "EOS", "PAD", "train_tokenizer", "sample_texts", "pack_blocks",
           "llama_config", "lr_at", "step_rows", "train_lm", "mean_loss", "install_dir", "build_default_models"]

EOS = "<|endoftext|>"  # separates files in the token stream; also BOS, and BBT's placeholder token
PAD = "<pad>"  # never trained on: it only fills the right end of batches


@dataclass
class PretrainConfig:
    """Build the default tokenizer and the "large" and "small" LMs from the stdlib's .py files."""
    output_dir: str = field("", "directory that receives large/ and small/ (default: $RAYDAPT_HOME/models)")
    seed: int = field(0, "master seed: tokenizer data, initialisation and data order derive from it")
    vocab_size: int = field(4096, "byte-level BPE vocabulary size, special tokens included")
    tokenizer_bytes: int = field(0, "bytes of pretrain text the tokenizer learns from (0: all of it)")
    context: int = field(256, "tokens per training sequence and the models' max_position_embeddings")
    batch_size: int = field(16, "sequences per optimizer step")
    large_width: int = field(256, "hidden size of the large LM")
    large_layers: int = field(4, "decoder layers of the large LM")
    large_heads: int = field(4, "attention heads of the large LM")
    large_ffn: int = field(512, "MLP intermediate size of the large LM")
    large_steps: int = field(1000, "AdamW steps for the large LM")
    large_lr: float = field(3e-3, "peak learning rate of the large LM")
    small_width: int = field(32, "hidden size of the small LM")
    small_layers: int = field(2, "decoder layers of the small LM")
    small_heads: int = field(2, "attention heads of the small LM")
    small_ffn: int = field(64, "MLP intermediate size of the small LM")
    small_steps: int = field(600, "AdamW steps for the small LM")
    small_lr: float = field(5e-3, "peak learning rate of the small LM")
    warmup: float = field(0.05, "fraction of the steps with a linear learning-rate warm-up")
    weight_decay: float = field(0.1, "AdamW weight decay")
    eval_blocks: int = field(64, "sequences of train and of held-out text the final losses average over")
    bf16: bool = field(True, "bf16 autocast for the matmuls (about 2x faster on CPUs with bf16 units); weights stay fp32")
    threads: int = field(2, "torch CPU threads (0: torch's default). Kernels may split work differently per "
                            "count, so byte-identical results need the same count; fixed so that the core count does not matter")

    def __post_init__(self):
        for name in ("vocab_size", "context", "batch_size", "large_width", "large_layers", "large_heads",
                     "large_ffn", "large_steps", "small_width", "small_layers", "small_heads",
                     "small_ffn", "small_steps", "eval_blocks"):
            check(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        check(self.vocab_size >= 300, "vocab_size", "must be at least 300 (256 bytes + specials + merges)")
        check(self.context >= 8, "context", f"must be at least 8, got {self.context}")
        for size in ("large", "small"):
            width, heads = getattr(self, f"{size}_width"), getattr(self, f"{size}_heads")
            check(width % heads == 0 and (width // heads) % 2 == 0, f"{size}_heads",
                  f"must divide {size}_width={width} into heads of even size, got {heads}")
        for name in ("large_lr", "small_lr"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(0 <= self.warmup < 1, "warmup", f"must be in [0, 1), got {self.warmup}")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.tokenizer_bytes >= 0, "tokenizer_bytes", "must be >= 0")
        check(self.threads >= 0, "threads", "must be >= 0")

    def out_dir(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else raydapt_home() / "models"


# Tiny sizes for tests and smoke runs: a few seconds, same code path.
QUICK = dict(vocab_size=512, tokenizer_bytes=400_000, context=64, batch_size=4, large_width=32,
             large_layers=4, large_heads=2, large_ffn=64, large_steps=24, small_width=16,
             small_layers=2, small_heads=2, small_ffn=32, small_steps=24, eval_blocks=8)


def sample_texts(texts: list[str], n_bytes: int, seed: int) -> list[str]:
    """Whole texts in a seeded order until about `n_bytes` characters (all when n_bytes <= 0)."""
    order = np.random.default_rng(seed).permutation(len(texts))
    out, total = [], 0
    for i in order:
        if 0 < n_bytes <= total:
            break
        out.append(texts[i])
        total += len(texts[i])
    return out


def train_tokenizer(texts: list[str], vocab_size: int, context: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (no unknown tokens, whitespace runs kept for indentation)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=context, padding_side="right")


def pack_blocks(tokenizer, texts: list[str], block: int) -> np.ndarray:
    """Texts joined by EOS into one stream, cut into (N, block) int64 rows (the tail is dropped)."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # long files are fine
    stream = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int64)
    n = len(stream) // block
    if n == 0:
        raise UserError(f"corpus too small: {len(stream)} tokens for one block of {block}")
    return stream[: n * block].reshape(n, block)


def llama_config(tokenizer, width: int, layers: int, heads: int, ffn: int, context: int) -> LlamaConfig:
    """A Llama decoder with tied input/output embeddings, no dropout, the tokenizer's special ids."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=context, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, use_cache=False)


def lr_at(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak.

    Not transformers' `get_cosine_with_min_lr_schedule_with_warmup`: its decay is this one, but its
    warm-up starts at lr 0 (step / n_warm, where this is (step + 1) / n_warm), so step 0 would not
    train; the shipped default models and CombLM experts were trained with this schedule."""
    n_warm = max(1, int(warmup * steps))
    if step < n_warm:
        return peak * (step + 1) / n_warm
    progress = (step - n_warm) / max(1, steps - n_warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_rows(n_rows: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) row indices: walks seeded permutations of the rows, reshuffled each epoch, so
    the data order depends on `seed` only (and a resumed run can jump to any step)."""
    rng = np.random.default_rng(seed)
    order, pos, out = rng.permutation(n_rows), 0, []
    for _ in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(n_rows), 0
        out.append(order[pos: pos + batch])
        pos += batch
    return np.stack(out)


def train_lm(model, blocks: np.ndarray, steps: int, batch_size: int, lr: float, warmup: float,
             weight_decay: float, seed: int, desc: str, bf16: bool = False) -> list[float]:
    """Next-token training with AdamW on random batches of `blocks` (N, T); returns the step losses.

    Batches follow `step_rows`, so the data order depends on `seed` only.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    rows, losses = step_rows(len(blocks), batch_size, steps, seed), []
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, unit="step", file=sys.stderr)):
        x = torch.from_numpy(blocks[rows[step]])  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def mean_loss(model, blocks: np.ndarray, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) over the rows of `blocks` (N, T)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = torch.from_numpy(blocks[i: i + batch_size])
        n = x.numel() - x.shape[0]  # predicted positions
        total += model(input_ids=x, labels=x).loss.item() * n
        count += n
    return total / count


def install_dir(tmp: Path, dest: Path) -> None:
    """Rename a finished build into place, replacing an older one.

    Until this point the build lives in a hidden temporary directory, so a killed build never leaves
    a `dest` that looks complete.
    """
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)


@contextlib.contextmanager
def _deterministic(threads: int):
    """Deterministic kernels (and a fixed thread count when asked), restored on exit."""
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--output-dir: cannot write to {path} ({e.strerror or e})")
    return path


def build_default_models(cfg: PretrainConfig, command: str = "") -> dict[str, Path]:
    """Train the tokenizer and both LMs, save them as HF checkpoint dirs; return {name: dir}."""
    out = _writable_dir(cfg.out_dir())
    start = time.time()
    corpus = load_corpus()
    with _deterministic(cfg.threads):
        texts = corpus.texts("pretrain")
        tokenizer = train_tokenizer(sample_texts(texts, cfg.tokenizer_bytes, cfg.seed),
                                    cfg.vocab_size, cfg.context)
        # Enough text for the longer run at ~3 characters per token, plus room for the train-loss set.
        need = max(cfg.large_steps, cfg.small_steps) * cfg.batch_size + cfg.eval_blocks
        blocks = pack_blocks(tokenizer, sample_texts(texts, need * cfg.context * 4, cfg.seed + 1),
                             cfg.context)
        held = pack_blocks(tokenizer, sample_texts(corpus.texts("held_out"), cfg.eval_blocks
                                                   * cfg.context * 8, cfg.seed + 2), cfg.context)
        held = held[np.random.default_rng(cfg.seed + 3).permutation(len(held))[: cfg.eval_blocks]]
        dirs = {}
        for i, name in enumerate(("large", "small")):
            shape = [getattr(cfg, f"{name}_{k}") for k in ("width", "layers", "heads", "ffn")]
            torch.manual_seed(cfg.seed * 1000 + i)  # initialisation
            model = LlamaForCausalLM(llama_config(tokenizer, *shape, cfg.context))
            t0 = time.time()
            losses = train_lm(model, blocks, getattr(cfg, f"{name}_steps"), cfg.batch_size,
                              getattr(cfg, f"{name}_lr"), cfg.warmup, cfg.weight_decay,
                              cfg.seed * 1000 + 10 + i, desc=f"pretrain {name}", bf16=cfg.bf16)
            recipe = {
                "command": command, "config": to_dict(cfg), "model": name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_seconds": round(time.time() - t0, 1),
                "build_seconds_so_far": round(time.time() - start, 1),
                "final_train_loss": round(mean_loss(model, blocks[: cfg.eval_blocks], cfg.batch_size), 4),
                "held_out_loss": round(mean_loss(model, held, cfg.batch_size), 4),
                "last_step_losses_mean": round(float(np.mean(losses[-max(1, len(losses) // 10):])), 4),
                "train_tokens_seen": getattr(cfg, f"{name}_steps") * cfg.batch_size * cfg.context,
                "train_blocks_available": int(len(blocks)),
                "corpus": corpus.stats(), "python": platform.python_version(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
            }
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
            try:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
                for f in (tmp, *tmp.iterdir()):  # mkdtemp and the shard writer make them private
                    f.chmod(0o755 if f.is_dir() else 0o644)
                install_dir(tmp, out / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            dirs[name] = out / name
            print(f"{name}: {recipe['parameters']:,} parameters, train loss {recipe['final_train_loss']}, "
                  f"held-out loss {recipe['held_out_loss']} -> {out / name}", file=sys.stderr)
    return dirs
