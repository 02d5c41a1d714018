"""The typed config of TAMS: the candidate operations, the cell's size, the controller's width."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from raydapt.errors import UserError

__all__ = ["OPS", "TAMSConfig"]

OPS = ("zero", "identity", "linear", "glu", "conv3", "conv5")  # the paper's search space


@dataclass
class TAMSConfig:
    """A DARTS-like cell beside every FFN: `nodes` nodes after the input node, every node fed by every
    earlier one (nodes (nodes + 1) / 2 edges), `width` channels, one of `ops` per edge."""
    ops: str = ",".join(OPS)
    width: int = 16
    nodes: int = 2
    controller_hidden: int = 32
    base_model: str = ""

    def __post_init__(self):
        names = self.op_list
        unknown = [o for o in names if o not in OPS]
        if unknown or not names or len(set(names)) != len(names):
            what = f"unknown operation {unknown[0]!r}" if unknown else f"{self.ops!r} is empty or repeats one"
            raise UserError(f"--tams-ops: {what}; accepted: a comma-separated subset of {', '.join(OPS)}")
        for name in ("width", "nodes", "controller_hidden"):
            if getattr(self, name) < 1:
                raise UserError(f"--tams-{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")

    @property
    def op_list(self) -> list[str]:
        return [o.strip() for o in self.ops.split(",") if o.strip()]

    @property
    def edges(self) -> int:
        return self.nodes * (self.nodes + 1) // 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TAMSConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
