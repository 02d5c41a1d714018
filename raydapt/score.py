"""`raydapt score`: next-token log-probs and entropies of a corpus under a sharded model, as parquet.

One output row per scored position t >= 1 of every input line: doc, pos, token_id, logprob
(log p(x_t | x_<t)), entropy (nats), and with --top-k the k most likely next tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raydapt.adapters.serve import check_adapters
from raydapt.comblm.use import CombinedLM
from raydapt.config import check, field
from raydapt.defaults import default_model_dir
from raydapt.errors import UserError
from raydapt.models.checkpoint import model_info
from raydapt.oracle import ShardedOracle, TokenScores
from raydapt.outputs import check_parquet_output
from raydapt.serving import PoolSpec, Runtime

__all__ = ["ScoreConfig", "read_corpus", "scores_table", "run_score"]


@dataclass
class ScoreConfig:
    """Score a corpus (jsonl of {"text": ...} or {"input_ids": [...]}) with a sharded model."""
    model: str = field("", "checkpoint directory (Hugging Face layout, safetensors); default: the built large LM")
    input: str = field("", "input .jsonl file: one {\"text\": str} or {\"input_ids\": [int]} per line")
    output: str = field("", "output .parquet file (written atomically)")
    stages: int = field(1, "pipeline stages per replica (contiguous layer ranges)")
    replicas: int = field(1, "pipeline replicas serving in parallel")
    top_k: int = field(0, "also write the k most likely next tokens per position (0: no)")
    micro_batch: int = field(8, "sequences per micro-batch")
    docs_per_request: int = field(256, "sequences per oracle request (one parquet row group each)")
    local: bool = field(False, "run the stages in this process instead of Ray actors")
    cpus_per_stage: float = field(1.0, "CPUs per stage actor")
    gpus_per_stage: float = field(0.0, "GPUs per stage actor")
    dtype: str = field("float32", "compute dtype", choices=("float32", "bfloat16", "float16"))
    combine: str = field("", "a finished jobs/comblm.py run directory: also write `combined_logprob`, the "
                             "log-prob under the large LM mixed with that run's expert")
    combiner: str = field("entropy_scalar", "with --combine: which fitted combiner mixes the two models")
    adapters: str = field("", "score the model extended by a jobs/extend.py run: its directory or its "
                              "adapters.safetensors (gated or vanilla adapters; LoRA and full fine-tuning: "
                              "export a merged checkpoint and give it as --model); --model defaults to the "
                              "backbone it records")

    def __post_init__(self):
        check(bool(self.input), "input", "is required")
        check(bool(self.output), "output", "is required")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")
        check(self.docs_per_request >= 1, "docs_per_request", f"must be >= 1, got {self.docs_per_request}")


def read_corpus(path: Path, model_dir: Path, max_positions: int, vocab_size: int) -> list[list[int]]:
    """Token ids per line, validated before anything runs."""
    if not path.is_file():
        raise UserError(f"--input: {path} does not exist")
    tokenizer = None
    docs = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                raise UserError(f"{path} line {line_no}: empty line; every line must be a JSON object")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {line_no}: not valid JSON ({e.msg})")
            if isinstance(record, dict) and "input_ids" in record:
                ids = record["input_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)):
                    raise UserError(f"{path} line {line_no}: \"input_ids\" must be a non-empty list of ints")
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                tokenizer = tokenizer or _tokenizer(model_dir)
                ids = tokenizer(record["text"])["input_ids"]
                if not ids:
                    raise UserError(f"--input {path} line {line_no}: \"text\" has no tokens; give some text "
                                    "or leave the line out")
            else:
                raise UserError(f"{path} line {line_no}: needs a \"text\" (string) or \"input_ids\" (list) field")
            if len(ids) > max_positions:
                raise UserError(f"{path} line {line_no}: {len(ids)} tokens, longer than the model's context "
                                f"of {max_positions}")
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise UserError(f"{path} line {line_no}: token ids must be in [0, {vocab_size})")
            docs.append(ids)
    if not docs:
        raise UserError(f"--input: {path} is empty")
    return docs


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir} has no usable tokenizer for \"text\" lines ({str(e).splitlines()[0]}); "
                        "give \"input_ids\" instead")


def scores_table(scores: TokenScores, input_ids: np.ndarray, first_doc: int,
                 combined: np.ndarray | None = None) -> pa.Table:
    """Flatten (N, T-1) scores to one row per real position."""
    n, width = scores.logprob.shape
    mask = np.arange(width)[None, :] < (scores.lengths - 1)[:, None]
    doc, col = np.nonzero(mask)
    columns = {
        "doc": pa.array(doc + first_doc, pa.int64()),
        "pos": pa.array(col + 1, pa.int32()),
        "token_id": pa.array(input_ids[doc, col + 1], pa.int32()),
        "logprob": pa.array(scores.logprob[mask], pa.float32()),
        "entropy": pa.array(scores.entropy[mask], pa.float32()),
    }
    if combined is not None:
        columns["combined_logprob"] = pa.array(combined[mask], pa.float32())
    if scores.topk_ids is not None:
        k = scores.topk_ids.shape[-1]
        offsets = pa.array(np.arange(0, (len(doc) + 1) * k, k, dtype=np.int32))
        columns["topk_ids"] = pa.ListArray.from_arrays(offsets, pa.array(scores.topk_ids[mask].ravel(), pa.int32()))
        columns["topk_logprobs"] = pa.ListArray.from_arrays(
            offsets, pa.array(scores.topk_logprobs[mask].ravel(), pa.float32()))
    return pa.table(columns)


def run_score(cfg: ScoreConfig, runtime: Runtime) -> dict:
    """Score `cfg.input` through a pool `runtime` opens; write the parquet atomically; a summary."""
    output = Path(cfg.output)
    check_parquet_output(output)
    served = check_adapters(cfg.adapters, cfg.model or None) if cfg.adapters else None
    model_dir = Path(cfg.model or (served.base if served else default_model_dir("large")))
    spec = PoolSpec(str(model_dir), cfg.stages, cfg.replicas, cfg.cpus_per_stage, cfg.gpus_per_stage, cfg.dtype,
                    adapters=served.path if served else "")
    spec.validate()
    info = model_info(model_dir)
    docs = read_corpus(Path(cfg.input), model_dir, info.max_positions, info.vocab_size)
    pool = runtime.open_pool(spec)
    oracle = ShardedOracle(pool, cfg.micro_batch)
    combined, per_request = None, cfg.docs_per_request
    if cfg.combine:
        combined = CombinedLM(cfg.combine, cfg.combiner, oracle)
        per_request = min(per_request, 16)  # full distributions: V floats per position in flight
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
    writer = None
    try:
        for start in tqdm(range(0, len(docs), per_request), desc="scoring", unit="request", disable=None):
            batch = docs[start:start + per_request]
            lengths = np.array([len(d) for d in batch])
            ids = np.zeros((len(batch), lengths.max()), np.int64)
            for i, d in enumerate(batch):
                ids[i, : len(d)] = d
            scores = oracle.token_logprobs(ids, lengths, top_k=cfg.top_k, full=combined is not None)
            mixed = combined.gold_logprobs(ids, scores) if combined else None
            table = scores_table(scores, ids, start, mixed)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        writer.close()
        os.replace(tmp, output)  # readers never see a half-written file under the final name
    finally:
        if tmp.exists():
            tmp.unlink()
        runtime.close_pool(pool)
    summary = {"docs": len(docs), "positions": int(sum(len(d) - 1 for d in docs)), "usage": oracle.usage.as_dict()}
    if served:
        summary["adapters"] = {"path": served.path, "method": served.config.method, "model": str(model_dir)}
    return summary
