"""Attaching TAMS to a Hugging Face decoder: a `tams_cell` beside every block's FFN (the FFN sites of
raydapt.adapters.attach, the same hooks as the gated adapters) and one `tams_controller` on the model.

`set_task(model, embedding)` makes the controller pick each edge's operation for a task; every cell
then uses that pick until the next call. OPT's FFN sees (B*T, d): a pre-hook on the block keeps
(B, T) so the causal convolutions run along each sequence.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from raydapt.adapters.attach import base_record, ffn_sites
from raydapt.adapters.tams.config import TAMSConfig
from raydapt.adapters.tams.layer import TAMSCell, TAMSController
from raydapt.errors import UserError

__all__ = ["attach_tams", "set_task", "task_embedding", "tams_cells", "controller_of"]

CELL_NAME, CONTROLLER_NAME = "tams_cell", "tams_controller"


def attach_tams(model: nn.Module, cfg: TAMSConfig, freeze: bool = True) -> tuple[nn.Module, TAMSConfig]:
    """Add a cell beside every FFN and the controller; (model, cfg with base). Init from torch's RNG."""
    cfg = dataclasses.replace(cfg, base_model=base_record(model))
    if freeze:
        model.requires_grad_(False)
    d, dtype = model.config.hidden_size, next(model.parameters()).dtype
    controller = TAMSController(d, cfg.controller_hidden, cfg.edges, len(cfg.op_list)).to(dtype)
    model.add_module(CONTROLLER_NAME, controller)
    for block, first, last in ffn_sites(model):
        cell = TAMSCell(d, cfg.width, cfg.nodes, cfg.op_list).to(dtype)
        block.add_module(CELL_NAME, cell)
        block.register_forward_pre_hook(_keep_shape(cell), with_kwargs=True)
        first.register_forward_pre_hook(_keep_input(cell))
        last.register_forward_hook(_add_cell(cell, controller))
    return model, cfg


def _keep_shape(cell):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cell._sequence_shape = hidden.shape[:2]
    return hook


def _keep_input(cell):
    def hook(module, args):
        cell._ffn_input = args[0]
    return hook


def _add_cell(cell, controller: TAMSController):
    def hook(module, args, output):
        x = cell.__dict__.pop("_ffn_input")
        if controller.choice is None:
            raise UserError("tams: no task selected; call set_task(model, task_embedding) first")
        flat = x.dim() == 2  # OPT
        if flat:
            x = x.view(*cell._sequence_shape, x.shape[-1])
        if controller.hard:
            y = cell(x, choice=controller.choice)
        else:
            y = cell(x, weights=controller.weights)
        return output + (y.reshape(-1, y.shape[-1]) if flat else y)
    return hook


def controller_of(model: nn.Module) -> TAMSController:
    return model.get_submodule(CONTROLLER_NAME)


def set_task(model: nn.Module, embedding: torch.Tensor, hard: bool = False) -> list[int]:
    """Pick every edge's operation for the task whose embedding (d,) is given; the choice per edge.
    The straight-through weights keep the controller's graph: call again after each optimizer step."""
    return controller_of(model).select(embedding, hard)


@torch.no_grad()
def task_embedding(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The task embedding: the mean input embedding over every token of its training data (n, T)."""
    return model.get_input_embeddings()(ids).reshape(-1, model.config.hidden_size).mean(0)


def tams_cells(model: nn.Module) -> list[TAMSCell]:
    return [m for m in model.modules() if isinstance(m, TAMSCell)]
