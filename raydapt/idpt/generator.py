"""The two prompts ID-PT compares: one learned per input by a prompt generator, and one static.

The generator (Levine et al., 2022) is a small frozen LM that reads the input behind its own
learned soft prompt; n_p learned queries cross-attend over its final states
(`torch.nn.MultiheadAttention`) and a linear map takes them to the large LM's embedding width:
n_p prompt vectors prepended to the large LM's input. Only the soft prompt, the queries, the
attention and the projection learn; the small LM stays frozen.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PromptGenerator", "StaticPrompt"]


class PromptGenerator(nn.Module):
    def __init__(self, encoder: nn.Module, prompt_length: int, soft_length: int, out_dim: int,
                 embedding_std: float, heads: int = 4):
        super().__init__()
        width = encoder.config.hidden_size
        self.encoder = encoder.eval().requires_grad_(False)
        self.base = getattr(encoder, encoder.base_model_prefix)  # the decoder without its LM head
        own_std = float(encoder.get_input_embeddings().weight.std())
        self.soft = nn.Parameter(torch.randn(soft_length, width) * own_std)
        self.queries = nn.Parameter(torch.randn(prompt_length, width) / math.sqrt(width))
        self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
        self.project = nn.Linear(width, out_dim)
        # Prompt vectors start at the scale of the large LM's token embeddings (its final-norm
        # outputs have unit scale, so the projection carries the scale).
        nn.init.normal_(self.project.weight, std=embedding_std / math.sqrt(width))
        nn.init.zeros_(self.project.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, whatever the module's mode
        return self

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The inputs' first `lengths` tokens (B, T) -> prompts (B, n_p, E of the large LM)."""
        rows, soft = input_ids.shape[0], self.soft.shape[0]
        tokens = self.encoder.get_input_embeddings()(input_ids)
        x = torch.cat([self.soft.expand(rows, -1, -1), tokens], 1)
        states = self.base(inputs_embeds=x).last_hidden_state          # causal: padding comes last
        padding = torch.arange(x.shape[1])[None, :] >= (lengths + soft)[:, None]
        attended, _ = self.attend(self.queries.expand(rows, -1, -1), states, states, key_padding_mask=padding,
                                  need_weights=False)
        return self.project(attended)


class StaticPrompt(nn.Module):
    """The baseline: one learned prompt of the same length for every input."""

    def __init__(self, prompt_length: int, out_dim: int, embedding_std: float):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(prompt_length, out_dim) * embedding_std)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.prompt.expand(input_ids.shape[0], -1, -1)
