"""The typed config of an extension of a frozen LM: which method, how big, how it is regularised.

One dataclass for every method (PEFT's one-config-per-method would give six near-copies here: the
methods differ in a gate, an init and an auxiliary loss). It validates itself, round-trips to JSON
and records the backbone it was attached to, so saved adapter weights can refuse a different base.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from raydapt.errors import UserError

__all__ = ["METHODS", "AdapterConfig", "GATED"]

# name -> what it is (Signe Talla, Grave, Jegou, ICML 2025, and its baselines/ablations)
METHODS = {
    "neutral": "neutral residues: ReLU block gate, l1 on the adapter output over original-domain tokens",
    "neutral-no-l1": "ablation: neutral residues without the l1 term",
    "neutral-sigmoid": "ablation: a sigmoid gate trained as a domain classifier with BCE (no l1)",
    "neutral-he": "ablation: neutral residues with He init (variance 2/d) of the input and gate weights",
    "adapter": "vanilla parallel adapter of the same size: no gate, no sparsity loss",
    "lora": "LoRA on every MLP linear layer, through the peft library, rank sized to --extra-params",
    "full": "full fine-tuning of every backbone weight",
}
GATED = ("neutral", "neutral-no-l1", "neutral-sigmoid", "neutral-he")


@dataclass
class AdapterConfig:
    """How to extend a frozen LM. `hidden` / `rank` are derived from `extra_params` by `attach`."""
    method: str = "neutral"
    extra_params: float = 0.2   # adapter parameters / backbone parameters
    alpha: float = 0.01         # weight of the l1 term (or of the BCE term for neutral-sigmoid)
    activation: str = "silu"    # sigma in A(x) = W_o(sigma(W_g x) * W_i x)
    base_model: str = ""        # recorded on attach: the backbone's model_type and sizes
    hidden: int = 0             # adapter width (gated/vanilla), set by attach
    rank: int = 0               # LoRA rank, set by attach

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"--method: {self.method!r} is not one of {list(METHODS)}")
        if not (math.isfinite(self.extra_params) and 0 < self.extra_params <= 1):
            raise UserError(f"--extra-params: must be in (0, 1], got {self.extra_params}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise UserError(f"--alpha: must be a finite number >= 0, got {self.alpha}")
        if self.activation not in ("silu", "gelu", "relu"):
            raise UserError(f"activation: {self.activation!r} is not one of ['silu', 'gelu', 'relu']")

    @property
    def gate(self) -> str:
        """'relu', 'sigmoid' or 'none'."""
        return {"neutral-sigmoid": "sigmoid", "adapter": "none"}.get(self.method, "relu")

    @property
    def aux_loss(self) -> str:
        """The term added to the LM loss: 'l1', 'bce' or 'none'."""
        return {"neutral": "l1", "neutral-he": "l1", "neutral-sigmoid": "bce"}.get(self.method, "none")

    @property
    def init(self) -> str:
        return "he" if self.method == "neutral-he" else "dL"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
