"""Every method's model and its meta-test: adapt on a held-out domain's train split, score test
perplexity. One recipe for all (Adam, `adapt_steps` steps of `inner_batch` sequences, rows a function
of (seed, domain, step)); only what moves differs: nothing (zero-shot), every backbone weight (full),
LoRA's matrices, or TARP (and the TAMS cells)."""
from __future__ import annotations

import math

import numpy as np
import torch

from raydapt.adapters.tams import attach_tams, set_task, task_embedding
from raydapt.adapters.tarp import attach_tarp
from raydapt.adapters.tarp.attach import TARGETS, backbone_only
from raydapt.mltd.maml import fast_parameters, has_tams, lm_loss

__all__ = ["build_model", "adapted_parameters", "adapt", "perplexity", "score_domain", "trainable_share"]

EVAL_BATCH = 16


def load_backbone(model_dir: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()


def build_model(model_dir: str, cfg, seed: int, meta: bool = False):
    """The method's model, initialised from `seed` (TARP, TAMS or LoRA attached). With `meta`, the
    parameters the outer loop updates keep requires_grad (the backbone too when --base-lr > 0)."""
    model = load_backbone(model_dir)
    torch.manual_seed(seed)
    if cfg.method in ("tarp", "multitask", "tarp-meta", "tams-meta"):
        model, _ = attach_tarp(model, cfg.tarp_config())
    if cfg.method == "tams-meta":
        model, _ = attach_tams(model, cfg.tams_config(), freeze=False)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model
        pattern = TARGETS[model.config.model_type]
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0, target_modules=pattern,
                          bias="none", fan_in_fan_out=model.config.model_type == "gpt2")
        model = get_peft_model(model, lora)
    if meta:
        for name, p in model.named_parameters():
            p.requires_grad_(cfg.base_lr > 0 or ".tarp." in name or "tams_" in name)
    return model.eval()


def adapted_parameters(model, method: str) -> list[torch.nn.Parameter]:
    """What the meta-test adaptation moves for `method`."""
    if method == "zero-shot":
        return []
    if method == "full":
        return [p for n, p in model.named_parameters() if not (".tarp." in n or "tams_" in n)]
    if method == "lora":
        return [p for n, p in model.named_parameters() if "lora_" in n]
    return fast_parameters(model)


def trainable_share(model, method: str) -> float:
    """Parameters the adaptation moves / backbone parameters."""
    moved = sum(p.numel() for p in adapted_parameters(model, method))
    base = model.get_base_model() if method == "lora" else model
    backbone = backbone_only(base) - (sum(p.numel() for n, p in base.named_parameters() if "lora_" in n))
    return moved / backbone


def adapt(model, params, train: torch.Tensor, steps: int, batch: int, lr: float, seed: int, domain: int) -> list[float]:
    """`steps` Adam steps on batches of train (n, T); the training losses."""
    if not params or steps == 0:
        return []
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        rows = np.random.default_rng([seed, domain, step, 13]).integers(0, len(train), batch)
        loss = lm_loss(model, train[torch.from_numpy(rows)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def perplexity(model, test: torch.Tensor) -> float:
    """exp(mean next-token NLL over every predicted token of test (m, T))."""
    total, count = 0.0, 0
    for start in range(0, len(test), EVAL_BATCH):
        x = test[start:start + EVAL_BATCH]
        total += float(lm_loss(model, x)) * x.shape[0] * (x.shape[1] - 1)
        count += x.shape[0] * (x.shape[1] - 1)
    return math.exp(total / count)


def score_domain(model, cfg, train: torch.Tensor, test: torch.Tensor, domain: int) -> dict:
    """Adapt a copy of the method's parameters on one held-out domain, score its test split, restore."""
    params = adapted_parameters(model, cfg.method)
    saved = [p.detach().clone() for p in params]
    choice = None
    if has_tams(model):
        choice = set_task(model, task_embedding(model, train), hard=True)  # argmax cell at test time
    lr = cfg.full_lr if cfg.method == "full" else cfg.inner_lr
    losses = adapt(model, params, train, cfg.adapt_steps, cfg.inner_batch, lr, cfg.seed, domain)
    ppl = perplexity(model, test)
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return {"perplexity": ppl, "adapt_losses": losses, "tams_choice": choice}
