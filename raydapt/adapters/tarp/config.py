"""The typed config of TARP: which low-rank form, which rank. Validates itself, round-trips to JSON and
records the backbone it was attached to (as raydapt.adapters.AdapterConfig does)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from raydapt.errors import UserError

__all__ = ["KINDS", "TARPConfig", "KRONECKER_N"]

KINDS = {
    "bilinear": "Phi = U V^T (static)",
    "kronecker": "Phi = sum_k H_k (x) U_k V_k^T, k = 1..n (static)",
    "dynamic": "Phi(x) = U Sigma(x) V^T, Sigma(x) an r x r matrix from one linear layer of the token",
}
KRONECKER_N = 4  # the paper's n


@dataclass
class TARPConfig:
    """TARP on every attention and FFN linear; `rank` is checked against each layer by attach."""
    kind: str = "dynamic"
    rank: int = 8
    n: int = KRONECKER_N      # Kronecker factors (kind "kronecker" only)
    base_model: str = ""      # recorded on attach: the backbone's model_type and sizes

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"--tarp: {self.kind!r} is not one of {list(KINDS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"--rank: must be an integer >= 1 (the paper uses 4 to 32), got {self.rank}")
        if self.n < 1:
            raise UserError(f"kronecker n: must be >= 1, got {self.n}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TARPConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
