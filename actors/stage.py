"""A stage worker: holds one shard of the frozen LM and runs micro-batches through it.

A plain class: `actors.pipeline` makes it a Ray actor where it is launched, and the in-process
pool uses it as is. Hidden states travel between stages as float32 numpy arrays (zero-copy
through Ray's object store); only the last stage's answers leave the pipeline.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings

import numpy as np
import torch

from raydapt.bbt.space import clipped_std
from raydapt.graybox import stage_graph, stage_vjp
from raydapt.models.checkpoint import read_config
from raydapt.models.heads import token_stats
from raydapt.models.prefix import run_blocks_shared
from raydapt.models.shard import DTYPES, load_shard

__all__ = ["StageWorker"]

# Arrays from the object store are read-only views; stages only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _node_id() -> str | None:
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class StageWorker:
    def __init__(self, model_dir: str, n_stages: int, stage: int, dtype: str = "float32",
                 device: str = "cpu", threads: int | None = None, replica: int | None = None,
                 simulated_latency_s: float = 0.0, graybox: bool = False, adapters: str = ""):
        if threads:
            # Same thread count for every stage whatever S and R are: results stay bitwise equal.
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.shard = load_shard(model_dir, n_stages, stage, dtype=dtype, device=device)
        if adapters:  # an extended model: this stage's blocks get their trained adapters (frozen)
            from raydapt.adapters.serve import attach_to_shard
            config = read_config(model_dir)[0]
            attach_to_shard(self.shard, adapters, config.model_type, config.hidden_size)
        self.stage = stage
        # A black-box oracle's stages answer forward calls only; gray-box calls need a pool opened
        # for them (PoolSpec.graybox), so a black-box method cannot reach gradients by mistake.
        self.graybox = graybox
        self.kept: dict[str, tuple] = {}  # gray-box graphs between a micro-batch's forward and backward
        # Simulated API latency for benchmarks (0 in real use): a sleep before every micro-batch,
        # outside the timed forward, so it changes no result and no stage metric.
        self.simulated_latency_s = float(simulated_latency_s)
        self.metrics = None
        if replica is not None:  # a Ray actor: export raydapt_stage_* metrics
            from actors.metrics import StageMetrics
            self.metrics = StageMetrics(stage, replica)

    def describe(self) -> dict:
        """Where this stage sits and how big it is (sizes only, never weights)."""
        block_params = sum(p.numel() for p in self.shard.blocks.parameters())
        return {"stage": self.stage, "layers": [self.shard.layers.start, self.shard.layers.stop],
                "block_params": block_params, "params": sum(p.numel() for p in self.shard.parameters()),
                "pid": os.getpid(), "device": str(self.device), "node": _node_id()}

    def ready(self) -> bool:
        return True

    def forward(self, mb: dict, hidden: np.ndarray | None, prompts: np.ndarray | None):
        """Run one micro-batch: returns hidden states (M,T,D) or, on the last stage, the answers."""
        if self.simulated_latency_s:
            time.sleep(self.simulated_latency_s)
        began = time.perf_counter()
        out = self._forward(mb, hidden, prompts)
        if self.metrics is not None:
            rows, width = mb["input_ids"].shape
            self.metrics.record(rows, rows * width, time.perf_counter() - began)
        return out

    @torch.inference_mode()
    def _forward(self, mb: dict, hidden: np.ndarray | None, prompts: np.ndarray | None):
        shard = self.shard
        rows = mb.get("prompt_index")
        mode = mb.get("mode", "add")
        if mb["kind"] == "statistics":
            return self._statistics(mb, hidden)
        if mb.get("shared"):
            return self._forward_shared(mb, hidden, prompts)
        if shard.is_first:
            ids = torch.from_numpy(mb["input_ids"]).to(self.device)
            shallow = None
            if prompts is not None and mode in ("add", "cat"):
                shallow = torch.from_numpy(prompts[rows]).to(self.device)
            h = shard.embed(ids, shallow, mode=mode, offset=mb.get("offset", 0))
        else:
            h = torch.from_numpy(hidden).to(self.device, self.dtype)
        deep = None
        if prompts is not None and mode == "deep":
            deep = torch.from_numpy(prompts[rows][:, shard.layers.start:shard.layers.stop]).to(self.device)
        h = shard.run_blocks(h, deep, offset=mb.get("offset", 0))
        if not shard.is_last:
            return h.float().cpu().numpy()
        if mb["kind"] == "labels":
            return self._label_logits(mb, h)
        ids = torch.from_numpy(mb["input_ids"]).to(self.device)
        # One row at a time through the head: (T,V) logits, not (M,T,V), for large vocabularies.
        parts = [token_stats(shard.logits(h[i:i + 1]), ids[i:i + 1], mb["top_k"], mb["full"])
                 for i in range(h.shape[0])]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _label_logits(self, mb: dict, h: torch.Tensor) -> np.ndarray:
        at = h[torch.arange(h.shape[0]), torch.from_numpy(mb["answer_pos"]).to(self.device)]  # (M,D)
        return self.shard.logits(at)[:, torch.from_numpy(mb["label_ids"]).to(self.device)].cpu().numpy()

    def _forward_shared(self, mb: dict, hidden: tuple | None, prompts: np.ndarray | None):
        """A micro-batch whose rows share their candidate's prefix (raydapt.models.prefix): the
        prefix runs once per candidate, (C, Lp), the rows' remaining positions (M, Ts) against it.
        Between stages the hidden states travel as the pair (prefix (C,Lp,D), rows (M,Ts,D))."""
        shard, mode, offset = self.shard, mb["mode"], mb["offset"]
        cands = mb["prefix_index"]                                          # (C,) candidates
        if shard.is_first:
            ids = torch.from_numpy(mb["prefix_ids"]).to(self.device).expand(len(cands), -1)  # (C, split)
            shallow = None
            if prompts is not None and mode in ("add", "cat"):
                shallow = torch.from_numpy(prompts[cands]).to(self.device)
            prefix = shard.embed(ids, shallow, mode=mode, offset=offset)   # (C, Lp, D)
            x = shard.token_embeddings(torch.from_numpy(mb["input_ids"]).to(self.device))
            rows = shard.embed_vectors(x, start=prefix.shape[1])           # (M, Ts, D)
        else:
            prefix, rows = (torch.from_numpy(a).to(self.device, self.dtype) for a in hidden)
        deep = None
        if prompts is not None and mode == "deep":
            deep = torch.from_numpy(prompts[cands][:, shard.layers.start:shard.layers.stop]).to(self.device)
        owner = torch.from_numpy(mb["owner"]).to(self.device)
        prefix, rows = run_blocks_shared(shard, prefix, rows, owner, deep, offset)
        if not shard.is_last:
            return prefix.float().cpu().numpy(), rows.float().cpu().numpy()
        return self._label_logits(mb, rows)

    # --- gray box ------------------------------------------------------------------------------
    def train_forward(self, key: str, mb: dict, hidden: np.ndarray | None):
        """Forward of a micro-batch that will be differentiated through: the output as in `forward`
        (hidden states, or the last stage's {"loss", "logits", "hidden"}); the graph is kept under
        `key` until `train_backward` unless the micro-batch says not to keep it (recompute)."""
        self._allow_graybox()
        leaf, output = stage_graph(self.shard, mb, hidden, self.device)
        if mb["keep"]:
            self.kept[key] = (leaf, output)
        if isinstance(output, dict):
            return {k: v.detach().float().cpu().numpy() for k, v in output.items()}
        return output.detach().float().cpu().numpy()

    def train_backward(self, key: str, mb: dict, hidden: np.ndarray | None, grad) -> np.ndarray:
        """The gradient of this stage's input, given its output's; releases the kept graph. Without
        one (recompute, or an actor restarted since forward) the graph is rebuilt from the input,
        which gives the same numbers: the input travels as an object ref that outlives the actor."""
        self._allow_graybox()
        kept = self.kept.pop(key, None)
        leaf, output = kept if kept is not None else stage_graph(self.shard, mb, hidden, self.device)
        return stage_vjp(leaf, output, grad)

    def kept_graphs(self) -> int:
        return len(self.kept)

    def frozen_state(self) -> dict:
        """A digest of this shard's weight bytes and how many weights want or hold a gradient (0 and
        0 for a frozen LM): tests check that training around it leaves it as it was."""
        digest = hashlib.sha256()
        for name, p in sorted(self.shard.state_dict(keep_vars=True).items()):
            digest.update(name.encode() + p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        params = list(self.shard.parameters())
        return {"digest": digest.hexdigest(), "requires_grad": sum(p.requires_grad for p in params),
                "grads": sum(p.grad is not None for p in params)}

    def _allow_graybox(self) -> None:
        if not self.graybox:
            raise PermissionError("this stage serves a black-box oracle: forward answers only, no gradients "
                                  "(open the pool with PoolSpec(graybox=True) for a gray-box method)")

    def _statistics(self, mb: dict, carried: dict | None) -> dict:
        """Scalars only: embedding std (first stage) and the clipped std of each block's input."""
        shard = self.shard
        stats = carried or {"embedding_std": None, "hidden_std": []}
        if shard.is_first:
            h = shard.embed(torch.from_numpy(mb["input_ids"]).to(self.device))
            weight = shard.modules_by_path[shard.family.embed_tokens].weight
            stats["embedding_std"] = float(weight.float().std())
        else:
            h = torch.from_numpy(stats.pop("hidden")).to(self.device, self.dtype)
        real = torch.arange(h.shape[1], device=h.device)[None, :] < torch.from_numpy(mb["lengths"]).to(h.device)[:, None]
        kwargs = shard.block_kwargs(h)
        for i, block in enumerate(shard.blocks):
            stats["hidden_std"].append(clipped_std(h[real].float().cpu().numpy()))
            out = block(h, **shard.with_window(kwargs, i, h.shape[1]))
            h = out[0] if isinstance(out, tuple) else out
        if not shard.is_last:
            stats["hidden"] = h.float().cpu().numpy()
        return stats

