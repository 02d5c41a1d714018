"""Reading a run's `adapters.safetensors` back onto its backbone, and exporting LoRA / full
fine-tuning as an ordinary merged checkpoint that every raydapt job and `raydapt score` serve as is.

The file's header records the adapter config (with the backbone's type and sizes) and the backbone
directory; loading onto another backbone is refused by that record, before any shape is compared.
Gated adapters cannot be merged (the gate is not linear): they are served by attaching them to each
stage's blocks (`raydapt.adapters.attach.attach_to_blocks`).

    python -m raydapt.extend.export RUN_DIR OUT_DIR [--model BASE]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from raydapt.adapters.config import AdapterConfig
from raydapt.errors import UserError, exit_on_user_error

__all__ = ["read_adapters", "load_run", "export_merged"]

ADAPTERS_FILE = "adapters.safetensors"


def read_adapters(path: str | Path) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(adapter config, header metadata, tensors) of an adapters file (safetensors: no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--adapters: {path} does not exist")
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)).get("__metadata__") or {}
        meta = json.loads(header["raydapt"])
        cfg = AdapterConfig.from_json(meta["adapter_config"])
        tensors = load_file(str(path))
    except (KeyError, ValueError, SafetensorError, OSError) as e:
        raise UserError(f"--adapters: {path} is not an adapters file written by jobs/extend.py ({e})")
    return cfg, meta, tensors


def load_run(adapters: str | Path, model_dir: str | None = None):
    """The extended model (eval mode) of an adapters file, on `model_dir` (default: the one it records)."""
    from raydapt.extend.job import load_extended

    cfg, meta, tensors = read_adapters(adapters)
    base = model_dir or meta["model"]
    model, attached = load_extended(base, AdapterConfig(**{**cfg.__dict__, "base_model": ""}), None)
    if json.loads(attached.base_model) != json.loads(cfg.base_model):
        raise UserError(f"--adapters: {adapters} was trained on another backbone ({cfg.base_model}); "
                        f"{base} is {attached.base_model}")
    from raydapt.adapters import load_trainable
    load_trainable(model, tensors)
    return model.eval(), cfg


def export_merged(run_dir: str | Path, out_dir: str | Path, model_dir: str | None = None) -> Path:
    """Write LoRA (merged into the weights) or full fine-tuning as a Hugging Face checkpoint dir."""
    model, cfg = load_run(Path(run_dir) / ADAPTERS_FILE, model_dir)
    if cfg.method not in ("lora", "full"):
        raise UserError(f"{cfg.method}: a gated adapter cannot be merged into the weights; serve it by "
                        "attaching it to the stages' blocks (raydapt.adapters.attach.attach_to_blocks)")
    if cfg.method == "lora":
        model = model.merge_and_unload()
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out} exists; choose a new directory")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    base = model_dir or json.loads(_meta(Path(run_dir) / ADAPTERS_FILE))["model"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if Path(base, name).exists():
            shutil.copy(Path(base, name), tmp)
    tmp.rename(out)  # complete before it has its name
    return out


def _meta(path: Path) -> str:
    return json.dumps(read_adapters(path)[1])


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--model", default=None, help="the backbone (default: the one the adapters record)")
    args = parser.parse_args(argv)
    print(export_merged(args.run_dir, args.out_dir, args.model))


if __name__ == "__main__":
    main()
