"""One pipeline stage of a frozen decoder, loaded without ever materialising the whole model.

The Hugging Face model is built on the `meta` device (shapes only, no memory); the stage keeps
the modules it owns, allocates them, and fills them with its own tensors read from safetensors.
Hidden states are right-padded, so sdpa's causal path is exact for every real position and
positions are simply 0..T-1 (or start..start+T-1 for the text after a shared prefix, see
`raydapt.models.prefix`). A sliding window (Mistral, Qwen2 with use_sliding_window) is a mask,
built only when a sequence is longer than the window: shorter ones are exactly causal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from raydapt.errors import UserError
from raydapt.models.checkpoint import load_tensors, read_config, tensor_index
from raydapt.models.families import Family
from raydapt.models.prompts import add_at_slots
from raydapt.models.sharding import plan_stages

__all__ = ["Shard", "load_shard", "stage_plan", "attention_mask", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _work_per_token(module: nn.Module | None) -> int:
    """Multiply-adds per token, to a good approximation: the parameters of every submodule but the
    embedding tables, which are looked up, not multiplied (an LM head tied to the embeddings is a
    Linear and counts in full)."""
    if module is None:
        return 0
    lookups = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in module.parameters() if id(p) not in lookups)


def _skeleton(config) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@dataclass(frozen=True)
class StagePlan:
    ranges: list[range]
    n_layers: int


def stage_plan(model_dir: str | Path, n_stages: int) -> StagePlan:
    """Layer ranges of an S-stage split, balanced by per-token compute (see `plan_stages`)."""
    config, family = read_config(model_dir)
    return _plan(_skeleton(config), family, n_stages)


def _plan(skeleton: nn.Module, family: Family, n_stages: int) -> StagePlan:
    blocks = skeleton.get_submodule(family.layers)
    first = sum(_work_per_token(_get(skeleton, p)) for p in (family.embed_tokens, *family.first_extras))
    last_paths = (family.final_norm or "", family.head, *family.last_extras)
    last = sum(_work_per_token(_get(skeleton, p)) for p in last_paths if p)
    ranges = plan_stages([_work_per_token(b) for b in blocks], n_stages, first, last)
    return StagePlan(ranges, len(blocks))


class Shard(nn.Module):
    """Blocks `layers` of a decoder, plus the embeddings (first stage) or norm and head (last)."""

    def __init__(self, family: Family, layers: range, n_layers: int, owned: dict[str, nn.Module | None],
                 blocks: list[nn.Module], rotary: nn.Module | None, max_positions: int,
                 windows: list[int | None] | None = None):
        super().__init__()
        self.family, self.layers, self.n_layers = family, layers, n_layers
        self.is_first, self.is_last = layers.start == 0, layers.stop == n_layers
        self.max_positions = max_positions
        self.owned = nn.ModuleDict({k.replace(".", "__"): m for k, m in owned.items() if m is not None})
        self.modules_by_path = {k: m for k, m in owned.items()}  # dotted paths for the family table
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary
        self.windows = list(windows) if windows is not None else [None] * len(blocks)  # per block

    # --- first stage -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, prompt: torch.Tensor | None = None, mode: str = "add",
              offset: int = 0) -> torch.Tensor:
        """input_ids (B,T) -> hidden (B,T',D). `prompt` (B,L,E) is added to the token embeddings
        at positions [offset, offset+L) ("add", BBT) or inserted there ("cat"), so T' = T + L."""
        x = self.token_embeddings(input_ids)  # (B,T,E)
        if prompt is not None:
            if mode == "add":
                x = add_at_slots(x, prompt, offset)
            else:
                x = torch.cat([x[:, :offset], prompt.to(x.dtype), x[:, offset:]], 1)
        return self.embed_vectors(x)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B,T) -> the token embeddings (B,T,E), before positions."""
        return self.modules_by_path[self.family.embed_tokens](input_ids)

    def embed_vectors(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Input embeddings (B,T,E) at positions start..start+T-1 -> the first block's input (B,T,D):
        positions added (learned position families), projected where the family projects."""
        pos = torch.arange(start, start + x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.family.embed(self.modules_by_path, x, pos)

    # --- every stage -------------------------------------------------------------------------
    def run_blocks(self, hidden: torch.Tensor, deep_prompt: torch.Tensor | None = None,
                   offset: int = 0) -> torch.Tensor:
        """hidden (B,T,D) through this stage's blocks. `deep_prompt` (B, n_blocks, L, D) is added at
        positions [offset, offset+L) of each block's input (BBTv2's prompt at every layer)."""
        kwargs = self.block_kwargs(hidden)
        for i, block in enumerate(self.blocks):
            if deep_prompt is not None:
                hidden = add_at_slots(hidden, deep_prompt[:, i], offset)
            out = block(hidden, **self.with_window(kwargs, i, hidden.shape[1]))
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def block_kwargs(self, hidden: torch.Tensor, start: int = 0) -> dict:
        """Keyword arguments of every block: no mask (sdpa's causal path), positions
        start..start+T-1 (start > 0: the text after a shared prefix, whose mask the caller sets)."""
        pos = torch.arange(start, start + hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        kwargs = {"attention_mask": None, "position_ids": pos}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, pos)
        return kwargs

    def with_window(self, kwargs: dict, block: int, length: int) -> dict:
        """`kwargs` with block `block`'s sliding-window mask when a sequence of `length` positions
        (from 0) is longer than its window; as is otherwise (the causal path is then exact)."""
        window = self.windows[block]
        if window is None or length <= window:
            return kwargs
        return kwargs | {"attention_mask": attention_mask(length, length, window, kwargs["position_ids"].device)}

    # --- last stage --------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> next-token logits (..., V), in float32."""
        h = self.family.finish(self.modules_by_path, hidden)
        return self.modules_by_path[self.family.head](h).float()


def attention_mask(queries: int, keys: int, window: int | None, device) -> torch.Tensor:
    """(1, 1, queries, keys) bool, True where a query may attend: the queries are the last
    `queries` of `keys` positions, causal, and within `window` positions when one is given."""
    q = torch.arange(keys - queries, keys, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window  # Hugging Face's sliding window: kv_idx > q_idx - window
    return allowed[None, None]


def _windows(config, layers: range) -> list[int | None]:
    """Each block's sliding window (Mistral: every layer; Qwen2: the layers its config marks
    "sliding_attention", none unless use_sliding_window); None for full attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    return [window if window and (types is None or types[i] == "sliding_attention") else None for i in layers]


def load_shard(model_dir: str | Path, n_stages: int, stage: int, dtype: str = "float32",
               device: str = "cpu") -> Shard:
    """Stage `stage` of an `n_stages` split of the checkpoint in `model_dir`; reads only its tensors."""
    config, family = read_config(model_dir)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {list(DTYPES)}")
    skeleton = _skeleton(config)
    plan = _plan(skeleton, family, n_stages)
    if not 0 <= stage < n_stages:
        raise UserError(f"stage {stage} out of range for {n_stages} stages")
    layers = plan.ranges[stage]
    owned: dict[str, nn.Module | None] = {}
    if layers.start == 0:
        owned |= {p: _get(skeleton, p) for p in (family.embed_tokens, *family.first_extras)}
    if layers.stop == plan.n_layers:
        owned |= {p: _get(skeleton, p) for p in (family.final_norm, family.head, *family.last_extras) if p}
    blocks_root = skeleton.get_submodule(family.layers)
    blocks = [blocks_root[i] for i in layers]
    named = dict(owned) | {f"{family.layers}.{i}": b for i, b in zip(layers, blocks)}
    _materialise(named, model_dir, skeleton, family, config, torch.device(device), DTYPES[dtype])
    rotary = None
    if family.rotary:
        rotary = type(skeleton.get_submodule(family.rotary))(config=config).to(device)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions")
    shard = Shard(family, layers, plan.n_layers, owned, blocks, rotary, max_positions, _windows(config, layers))
    return shard.eval().requires_grad_(False)


def _materialise(named: dict[str, nn.Module | None], model_dir, skeleton, family: Family, config,
                 device: torch.device, dtype: torch.dtype) -> None:
    """Allocate each module for real and copy its tensors in from the checkpoint."""
    files = tensor_index(model_dir)
    prefix = f"{skeleton.base_model_prefix}."
    tied = getattr(config, "tie_word_embeddings", False)

    def resolve(key: str) -> str:
        if key in files:
            return key
        if key == f"{family.head}.weight" and tied:
            return resolve(f"{family.embed_tokens}.weight")
        if key.startswith(prefix) and key[len(prefix):] in files:  # saved from the base model
            return key[len(prefix):]
        raise UserError(f"checkpoint {model_dir} lacks tensor {key!r}")

    wanted = {}
    for path, module in named.items():
        if module is not None:
            for name in module.state_dict():
                wanted[f"{path}.{name}"] = resolve(f"{path}.{name}")
    tensors = load_tensors(files, sorted(set(wanted.values())))
    for path, module in named.items():
        if module is None:
            continue
        module.to_empty(device=device)
        module.to(dtype)
        state = {name: tensors[wanted[f"{path}.{name}"]] for name in module.state_dict()}
        for name, value in state.items():
            if tuple(value.shape) != tuple(module.state_dict()[name].shape):
                raise UserError(f"checkpoint {model_dir}: tensor {path}.{name} has shape {tuple(value.shape)}, "
                                f"config expects {tuple(module.state_dict()[name].shape)}")
        module.load_state_dict(state, strict=True)
