"""Apply a learned prompt to new inputs: `raydapt classify --run DIR --input X.jsonl --output Y.parquet`.

Everything needed comes from DIR/best_prompt.safetensors (the prompt and, in its header, the model,
template, placeholder, mode and label words that `raydapt.bbt.job.prompt_metadata` recorded), and
inputs are encoded by the jobs' own `encode_texts`, so the job's test set gives its test accuracy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydapt.bbt.inputs import encode_texts
from raydapt.bbt.losses import accuracy
from raydapt.config import check, field
from raydapt.errors import UserError
from raydapt.models.checkpoint import model_info
from raydapt.oracle import ShardedOracle
from raydapt.outputs import check_parquet_output, write_atomic
from raydapt.serving import PoolSpec, Runtime

__all__ = ["ClassifyConfig", "read_prompt", "run_classify"]


@dataclass
class ClassifyConfig:
    """Classify texts with a finished BBT / BBTv2 / GDFO run's learned prompt."""
    run: str = field("", "output directory of a finished jobs/bbt.py or jobs/gdfo.py run (GDFO: DIR/gdfo)")
    input: str = field("", "input .jsonl file: one {\"text\": str} per line, optionally with \"label\"")
    output: str = field("", "output .parquet file (written atomically)")
    micro_batch: int = field(32, "rows per oracle micro-batch")
    local: bool = field(False, "run the stages in this process instead of Ray actors")

    def __post_init__(self):
        for name in ("run", "input", "output"):
            check(bool(getattr(self, name)), name, "is required")
        check(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")


def read_prompt(run: Path) -> tuple[np.ndarray, dict]:
    """The prompt (1, ...) and its recorded metadata, or a UserError naming what is missing."""
    from safetensors import safe_open

    path = run / "best_prompt.safetensors"
    if not path.is_file():
        raise UserError(f"--run: {run} holds no best_prompt.safetensors (is it a finished BBT/GDFO run?)")
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("raydapt", "{}"))
        prompt = f.get_tensor("prompt")
    if "template" not in meta:
        raise UserError(f"--run: {path} was written before prompts recorded how to apply them; rerun the job")
    return prompt[None], meta


def _read_inputs(path: Path, names: list[str]) -> tuple[list[str], np.ndarray | None]:
    if not path.is_file():
        raise UserError(f"--input: {path} does not exist")
    texts, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--input: {path} line {n} is not JSON ({e.msg})")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
            raise UserError(f"--input: {path} line {n} needs a non-empty \"text\" string")
        texts.append(row["text"])
        if "label" in row:
            label = row["label"]
            if label not in names and not (isinstance(label, int) and 0 <= label < len(names)):
                raise UserError(f"--input: {path} line {n}: label {label!r} is not one of {names} or 0..{len(names) - 1}")
            labels.append(names.index(label) if label in names else label)
    if not texts:
        raise UserError(f"--input: {path} has no lines")
    if labels and len(labels) != len(texts):
        raise UserError(f"--input: {path}: {len(labels)} of {len(texts)} lines have a label; give all or none")
    return texts, (np.array(labels, np.int64) if labels else None)


def run_classify(cfg: ClassifyConfig, runtime: Runtime) -> dict:
    """Predicted label and per-label log-probs (softmax over the label words) per input line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    prompt, meta = read_prompt(Path(cfg.run))
    output = Path(cfg.output)
    check_parquet_output(output)
    names, label_ids = json.loads(meta["label_names"]), json.loads(meta["label_ids"])
    texts, labels = _read_inputs(Path(cfg.input), names)
    info = model_info(meta["model"])
    tokenizer = AutoTokenizer.from_pretrained(meta["model"])
    split = encode_texts(texts, labels if labels is not None else np.zeros(len(texts)), tokenizer, meta["template"],
                         int(meta["prompt_length"]), meta["input_mode"], info.max_positions, meta["placeholder"])
    spec = PoolSpec(meta["model"])
    spec.validate()
    pool = runtime.open_pool(spec)
    try:
        oracle = ShardedOracle(pool, cfg.micro_batch)
        logits = oracle.label_logits(split.input_ids, split.lengths, label_ids, prompt, meta["mode"],
                                     int(meta["prompt_offset"]))[0]
    finally:
        runtime.close_pool(pool)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    predicted = logp.argmax(axis=-1)
    columns = {"text": texts, "predicted": [names[k] for k in predicted], "predicted_class": predicted}
    columns |= {f"logprob_{name}": logp[:, k].astype(np.float32) for k, name in enumerate(names)}
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), buffer)
    write_atomic(output, buffer.getvalue().to_pybytes())  # never half-written under the final name
    summary = {"inputs": len(texts), "output": str(output.resolve()), "usage": oracle.usage.as_dict()}
    if labels is not None:
        summary["accuracy"] = float(accuracy(logits, labels))
    return summary
