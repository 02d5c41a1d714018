"""One training step of an extension, and the model it trains: what jobs/extend.py's Ray Train
workers run (actors/extend_trainer.py) and what bench/extend.py times, written once."""
from __future__ import annotations

import torch

from raydapt.adapters import AdapterConfig, attach, extension_loss

__all__ = ["extended_model", "optimizer", "training_step"]


def extended_model(model_dir: str, adapter: AdapterConfig, seed: int):
    """The frozen backbone in eval mode (no dropout: a fixed function, so restarts replay the same
    steps) extended by `adapter`, initialised from `seed`; (model, the sized adapter config)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    torch.manual_seed(seed)  # the same adapter init on every worker
    return attach(model, adapter)


def optimizer(model, lr: float) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    """(what trains, its AdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))


def training_step(model, params, opt, adapter: AdapterConfig, x: torch.Tensor, original: torch.Tensor) -> dict:
    """Loss on token ids x (b, T) with the per-token domain mask `original` (b, T), backward (under DDP
    the gradients are averaged there), clipped to norm 1, one AdamW step; the loss terms."""
    out = extension_loss(model, x, original, adapter)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return out
