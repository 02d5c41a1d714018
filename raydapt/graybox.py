"""The gray-box oracle: a frozen LM served by pipeline stages that is differentiated through.

Methods that train small networks around a frozen LM (input-dependent prompts, recursive LMs,
frozen readers; Levine et al. 2022) need d(loss)/d(what they feed it), never its weights. Each
stage builds its part of the graph for a micro-batch and keeps it until backward (or, with
`recompute`, keeps nothing and rebuilds it from its input then), and backward runs stage S -> 1
with the gradient of each stage's input as the next one's output gradient, GPipe-style: every
micro-batch forward, then every micro-batch backward. Micro-batches have a fixed number of rows
whatever R and S are, so gradients do not depend on either.

`stage_graph` and `stage_vjp` are what a stage computes; `ShardedGrayBox` cuts requests into
micro-batches and puts the answers together; `FrozenLM` makes the oracle one differentiable torch
call for a coordinator's module.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raydapt.errors import UserError
from raydapt.oracle import GrayBoxRequest, GrayUsage, ModelInfo, ShardedOracle, _check_batch, _chunks
from raydapt.serving import FaultInjection, PoolSpec

__all__ = ["stage_graph", "stage_vjp", "ShardedGrayBox", "FrozenLM", "IGNORE", "graybox_pool_spec", "open_frozen_lm"]

IGNORE = -100  # label of a position that has no loss (Hugging Face's ignore_index)
_keys = itertools.count()


# --- one stage ------------------------------------------------------------------------------------
def stage_graph(shard, mb: dict, hidden: np.ndarray | None, device: torch.device) -> tuple[torch.Tensor, Any]:
    """This stage's forward for micro-batch `mb`, differentiable in its input: (leaf, output).

    The leaf is the first stage's input embeddings (M, T', E), prompt inserted, or another stage's
    incoming hidden states (M, T', D). The output is the hidden states for the next stage or, on the
    last, {"loss", "logits", "hidden"} as asked. The weights are frozen: only the leaf gets a grad.
    """
    with torch.set_grad_enabled(mb["for_backward"]):
        if shard.is_first:
            leaf = _input_embeddings(shard, mb, device).requires_grad_(mb["for_backward"])
            h = shard.embed_vectors(leaf)
        else:
            leaf = torch.from_numpy(hidden).to(device, shard_dtype(shard)).requires_grad_(mb["for_backward"])
            h = leaf
        h = shard.run_blocks(h)
        return leaf, (h if not shard.is_last else _answers(shard, mb, h, device))


def stage_vjp(leaf: torch.Tensor, output: Any, grad: Any) -> np.ndarray:
    """d(objective)/d(leaf) given d(objective)/d(output) (an array, or a dict like the output)."""
    if isinstance(output, dict):
        outs = [output[k] for k in grad]
        grads = [torch.from_numpy(np.asarray(grad[k])).to(output[k].device, output[k].dtype) for k in grad]
    else:
        outs, grads = [output], [torch.from_numpy(np.asarray(grad)).to(output.device, output.dtype)]
    (g,) = torch.autograd.grad(outs, [leaf], grads, allow_unused=True)
    return (torch.zeros_like(leaf) if g is None else g).float().cpu().numpy()


def shard_dtype(shard) -> torch.dtype:
    return next(shard.parameters()).dtype


def _input_embeddings(shard, mb: dict, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        if mb.get("inputs_embeds") is not None:
            x = torch.from_numpy(mb["inputs_embeds"]).to(device, shard_dtype(shard))
        else:
            x = shard.token_embeddings(torch.from_numpy(mb["input_ids"]).to(device))
        if mb.get("prompt") is not None:
            o, prompt = mb["offset"], torch.from_numpy(mb["prompt"]).to(device, x.dtype)
            x = torch.cat([x[:, :o], prompt, x[:, o:]], 1)
    return x.detach().clone()


def _answers(shard, mb: dict, h: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    if mb.get("labels") is not None:
        labels = torch.from_numpy(mb["labels"]).to(device)          # (M, T'), prompted space
        logits = shard.logits(h[:, :-1])                             # position t predicts t + 1
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE, reduction="none")
        out["loss"] = nll.view(labels.shape[0], -1).sum(1)
    if mb.get("positions") is not None:
        at = torch.from_numpy(mb["positions"]).to(device)           # (M, K)
        out["logits"] = shard.logits(h[torch.arange(h.shape[0], device=device)[:, None], at])
    if mb.get("hidden"):
        out["hidden"] = shard.family.finish(shard.modules_by_path, h).float()
    return out


# --- the coordinator's side -----------------------------------------------------------------------
@dataclass
class _Step:
    """What `backward` needs of a `forward`: the micro-batches' rows, widths and pool handles."""
    request: GrayBoxRequest
    chunks: list[np.ndarray]
    handles: list[Any]
    widths: list[int]
    done: bool = False


@dataclass
class ShardedGrayBox:
    """The gray-box protocol over a pool of pipeline replicas opened with `graybox=True`.

    Micro-batch i goes to replica i mod R, forward and backward (its stages keep its graph).
    `recompute`: stages keep nothing between forward and backward and rebuild the graph from
    their input (less memory, one more forward). Gradients of padding rows are zero."""
    pool: Any
    micro_batch_size: int = 8
    recompute: bool = False
    usage: GrayUsage = field(default_factory=GrayUsage)

    @property
    def info(self) -> ModelInfo:
        return self.pool.info

    def forward(self, request: GrayBoxRequest, for_backward: bool = True) -> tuple[dict[str, np.ndarray], _Step]:
        request = _check_request(request, self.info)
        prompt_len = 0 if request.prompt is None else request.prompt.shape[1]
        labels = _prompted_labels(request, prompt_len)
        rows = np.arange(len(request.lengths))
        chunks = [c[:, 0] for c in _chunks(rows[:, None], self.micro_batch_size)]  # fixed size, last padded
        key, handles, widths = next(_keys), [], []
        for i, chunk in enumerate(chunks):
            width = int(request.lengths[chunk].max())
            mb = {"input_ids": request.input_ids[chunk, :width], "offset": request.offset,
                  "prompt": None if request.prompt is None else request.prompt[chunk],
                  "inputs_embeds": None if request.inputs_embeds is None else request.inputs_embeds[chunk, :width],
                  "labels": None if labels is None else labels[chunk, :width + prompt_len],
                  "positions": None if request.positions is None else request.positions[chunk],
                  "hidden": request.hidden, "for_backward": for_backward,
                  "keep": for_backward and not self.recompute}
            handles.append(self.pool.train_forward(i % self.pool.n_replicas, f"{key}:{i}", mb))
            widths.append(width + prompt_len)
        answers = self.pool.gather([h["output"] for h in handles])
        real = np.arange(max(widths))[None, :] < (request.lengths + prompt_len)[:, None]  # (N, T'max)
        self.usage.requests += 1
        self.usage.examples += len(rows)
        self.usage.forward_tokens += int((request.lengths + prompt_len).sum())
        step = _Step(request, chunks, handles, widths, done=not for_backward)
        outputs = _assemble(answers, chunks, len(rows), max(widths))
        if "hidden" in outputs:  # a padded position's state is not part of the answer
            outputs["hidden"] *= real[..., None]
        return outputs, step

    def backward(self, step: _Step, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if step.done:
            raise ValueError("backward needs a forward(for_backward=True) that has not been back-propagated")
        step.done = True
        refs = []
        for chunk, handle, width in zip(step.chunks, step.handles, step.widths):
            real = _real_rows(chunk)
            g = {k: np.where(_expand(real, v.ndim), v[chunk], 0).astype(np.float32) for k, v in grads.items()}
            if "hidden" in g:  # none through padded positions, whose states forward reported as 0
                positions = np.arange(width)[None, :] < (step.request.lengths[chunk] + _prompt_len(step.request))[:, None]
                g["hidden"] = np.ascontiguousarray(g["hidden"][:, :width] * positions[..., None])
            refs.append(self.pool.train_backward(handle, g))
        parts = self.pool.gather(refs)
        request = step.request
        n, widest = len(request.lengths), max(step.widths)
        grad_x = np.zeros((n, widest, parts[0].shape[-1]), np.float32)
        for chunk, part in zip(step.chunks, parts):
            real = _real_rows(chunk)
            grad_x[chunk[real], : part.shape[1]] = part[real]
        self.usage.backward_tokens += int((request.lengths + _prompt_len(request)).sum())
        return _split_grad(grad_x, request)


def _real_rows(chunk: np.ndarray) -> np.ndarray:
    """Which rows of a micro-batch are real: padding repeats the last row, and gets no gradient."""
    return np.r_[True, chunk[1:] != chunk[:-1]]


def _expand(mask: np.ndarray, ndim: int) -> np.ndarray:
    return mask.reshape(-1, *([1] * (ndim - 1)))


def _prompt_len(request: GrayBoxRequest) -> int:
    return 0 if request.prompt is None else request.prompt.shape[1]


def _split_grad(grad_x: np.ndarray, request: GrayBoxRequest) -> dict[str, np.ndarray]:
    """The gradient of the prompted input embeddings, cut into the request's own inputs."""
    o, length = request.offset, _prompt_len(request)
    out = {}
    if request.prompt is not None:
        out["prompt"] = grad_x[:, o:o + length]
    if request.inputs_embeds is not None:
        rest = np.concatenate([grad_x[:, :o], grad_x[:, o + length:]], 1)  # (N, longest row, E)
        out["inputs_embeds"] = np.zeros_like(request.inputs_embeds)
        out["inputs_embeds"][:, : rest.shape[1]] = rest
    return out


def _assemble(answers: list[dict], chunks: list[np.ndarray], n: int, widest: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for chunk, answer in zip(chunks, answers):
        for name, value in answer.items():
            if name not in out:
                shape = (n, widest, *value.shape[2:]) if name == "hidden" else (n, *value.shape[1:])
                out[name] = np.zeros(shape, np.float32)
            if name == "hidden":
                out[name][chunk, : value.shape[1]] = value
            else:
                out[name][chunk] = value
    return out


def _prompted_labels(request: GrayBoxRequest, prompt_len: int) -> np.ndarray | None:
    """Token-space labels -> prompted-sequence labels (the prompt's positions have none)."""
    if request.labels is None:
        return None
    labels = np.where(np.arange(request.labels.shape[1]) < request.lengths[:, None], request.labels, IGNORE)
    o = request.offset
    gap = np.full((len(labels), prompt_len), IGNORE, np.int64)
    return np.ascontiguousarray(np.concatenate([labels[:, :o], gap, labels[:, o:]], 1))


def _check_request(r: GrayBoxRequest, info: ModelInfo) -> GrayBoxRequest:
    ids, lengths = _check_batch(r.input_ids, r.lengths, info)
    n, width = ids.shape
    prompt = None if r.prompt is None else np.ascontiguousarray(r.prompt, np.float32)
    if prompt is not None and (prompt.ndim != 3 or prompt.shape[0] != n or prompt.shape[2] != info.embed_dim):
        raise UserError(f"prompt must have shape (N={n}, L, E={info.embed_dim}), got {prompt.shape}")
    length = 0 if prompt is None else prompt.shape[1]
    if int(lengths.max()) + length > info.max_positions:
        raise UserError(f"a prompted input of {int(lengths.max()) + length} positions exceeds the model's "
                        f"context of {info.max_positions}")
    if not 0 <= r.offset <= int(lengths.min()):
        raise UserError(f"prompt offset {r.offset} must be in [0, {int(lengths.min())}] (the shortest input)")
    embeds = None if r.inputs_embeds is None else np.ascontiguousarray(r.inputs_embeds, np.float32)
    if embeds is not None and embeds.shape != (n, width, info.embed_dim):
        raise UserError(f"inputs_embeds must have shape {(n, width, info.embed_dim)}, got {embeds.shape}")
    labels = None if r.labels is None else np.asarray(r.labels, np.int64)
    if labels is not None and labels.shape != ids.shape:
        raise UserError(f"labels must have the shape of input_ids {ids.shape}, got {labels.shape}")
    positions = None if r.positions is None else np.asarray(r.positions, np.int64)
    if positions is not None and (positions.ndim != 2 or len(positions) != n or positions.min() < 0
                                  or (positions >= (lengths + length)[:, None]).any()):
        raise UserError("positions must be (N, K) indices inside each prompted sequence")
    if labels is None and positions is None and not r.hidden:
        raise UserError("a gray-box request asks for nothing: give labels, positions or hidden=True")
    return GrayBoxRequest(ids, lengths, labels, prompt, int(r.offset), embeds, positions, bool(r.hidden))


# --- torch ------------------------------------------------------------------------------------------
class _ThroughFrozen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, oracle, request, names, prompt, inputs_embeds):
        outputs, step = oracle.forward(request, for_backward=True)
        ctx.oracle, ctx.step, ctx.names = oracle, step, names
        return tuple(torch.from_numpy(outputs[n]) for n in names)

    @staticmethod
    def backward(ctx, *grads):
        g = ctx.oracle.backward(ctx.step, {n: gr.detach().cpu().float().numpy() for n, gr in zip(ctx.names, grads)})
        as_tensor = lambda name: None if name not in g else torch.from_numpy(g[name])  # noqa: E731
        return None, None, None, as_tensor("prompt"), as_tensor("inputs_embeds")


class FrozenLM:
    """The gray-box oracle as one differentiable call: tensors in (a prompt, input embeddings from a
    connector), tensors out ({"loss", "logits", "hidden"}), and `.backward()` on anything computed
    from them reaches the coordinator's modules through the frozen LM's stages."""

    def __init__(self, oracle):
        self.oracle = oracle

    def __call__(self, input_ids, lengths, labels=None, prompt: torch.Tensor | None = None, offset: int = 0,
                 inputs_embeds: torch.Tensor | None = None, positions=None, hidden: bool = False) -> dict:
        as_np = lambda t: None if t is None else t.detach().cpu().float().numpy()  # noqa: E731
        request = GrayBoxRequest(np.asarray(input_ids), np.asarray(lengths), labels, as_np(prompt), offset,
                                 as_np(inputs_embeds), positions, hidden)
        names = [n for n, asked in (("loss", labels is not None), ("logits", positions is not None),
                                    ("hidden", hidden)) if asked]
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (prompt, inputs_embeds))
        if not needs_grad:  # evaluation: the stages keep nothing
            outputs, _ = self.oracle.forward(request, for_backward=False)
            return {n: torch.from_numpy(outputs[n]) for n in names}
        dummy = torch.zeros(0, requires_grad=True)  # autograd.Function needs a tensor input that wants grad
        values = _ThroughFrozen.apply(self.oracle, request, names, prompt if prompt is not None else dummy,
                                      inputs_embeds if inputs_embeds is not None else dummy)
        return dict(zip(names, values))


def graybox_pool_spec(cfg):
    """(PoolSpec, FaultInjection or None) of a gray-box job's stages from its flags (model, stages,
    replicas, cpus_per_stage, fault_injection, local), checked before any worker starts."""
    fault = FaultInjection.parse(cfg.fault_injection)
    if fault and cfg.local:
        raise UserError("--fault-injection needs Ray stage actors; drop --local")
    spec = PoolSpec(cfg.model, cfg.stages, cfg.replicas, cfg.cpus_per_stage, graybox=True)
    spec.validate()
    return spec, fault


def open_frozen_lm(pool, cfg, train) -> tuple[FrozenLM, float]:
    """FrozenLM over `pool`, and the std of the large LM's input embeddings on a few training rows:
    the scale the trained modules' vectors start at."""
    frozen = FrozenLM(ShardedGrayBox(pool, cfg.micro_batch, cfg.recompute))
    std = ShardedOracle(pool).statistics(train.input_ids[:8], train.lengths[:8])["embedding_std"]
    return frozen, std
