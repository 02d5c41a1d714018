"""BBT's random projection from a small search space to prompt embeddings (pure torch/numpy).

BBT (Sun et al., ICML 2022, Sec. 3.2, Eq. 2): the prompt is p = A z + p0 with z in R^d searched by
CMA-ES and A in R^{(L*D) x d} a fixed random matrix. The reference code draws
A ~ N(0, s), s = alpha * std_emb / (sqrt(d) * sigma): with z ~ N(0, sigma^2 I) each entry of A z has
std alpha * std_emb, the scale of real embeddings. BBTv2 (Sun et al., EMNLP 2022, Sec. 3) adds a
prompt at every layer, each with its own A_l scaled by that layer's hidden-state std.

A is generated from a seed on whichever process needs it, never shipped. Adding p0 (the
placeholder embeddings) is the model's business; these classes only compute A z.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from raydapt.config import check

__all__ = ["PromptSpace", "DeepPromptSpace", "clipped_std", "layer_seed"]

DISTRIBUTIONS = ("normal", "uniform")


class PromptSpace:
    """z in R^d -> prompt A z in R^{L x D} (BBT Eq. 2, without the p0 offset).

    distribution="normal": A ~ N(0, s^2), s = alpha * embedding_std / (sqrt(d) * sigma).
    distribution="uniform": A ~ U(-u, u), u = sqrt(3) * s, so A has the same std s as in the normal
    case (the std of U(-u, u) is u / sqrt(3)); the paper's first version used a uniform A.

    Determinism: A is drawn from torch.Generator().manual_seed(seed) in float32, so one seed gives
    bitwise one A; `project` is a single float32 matmul z @ A.T, so the same z array gives bitwise
    the same prompts (rows of a batch agree with the row projected alone to float32 rounding only,
    since BLAS may block differently by batch size).
    """

    def __init__(self, intrinsic_dim: int, prompt_length: int, width: int, embedding_std: float, seed: int,
                 distribution: str = "normal", alpha: float = 1.0, sigma: float = 1.0):
        check(intrinsic_dim >= 1, "intrinsic_dim", f"must be >= 1, got {intrinsic_dim}")
        check(prompt_length >= 1, "prompt_length", f"must be >= 1, got {prompt_length}")
        check(width >= 1, "width", f"must be >= 1, got {width}")
        check(math.isfinite(embedding_std) and embedding_std > 0, "embedding_std",
              f"must be a finite number > 0, got {embedding_std}")
        check(seed >= 0, "seed", f"must be >= 0, got {seed}")
        check(distribution in DISTRIBUTIONS, "distribution", f"{distribution!r} is not one of {list(DISTRIBUTIONS)}")
        check(alpha > 0, "alpha", f"must be > 0, got {alpha}")
        check(sigma > 0, "sigma", f"must be > 0, got {sigma}")
        self.intrinsic_dim, self.prompt_length, self.width = intrinsic_dim, prompt_length, width
        self.embedding_std, self.seed, self.distribution = float(embedding_std), int(seed), distribution
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.scale = self.alpha * self.embedding_std / (math.sqrt(intrinsic_dim) * self.sigma)
        g = torch.Generator().manual_seed(self.seed)
        A = torch.empty(prompt_length * width, intrinsic_dim, dtype=torch.float32)  # (L*D, d)
        if distribution == "normal":
            A.normal_(0.0, self.scale, generator=g)
        else:
            u = math.sqrt(3.0) * self.scale
            A.uniform_(-u, u, generator=g)
        self._A = A
        self._on_device: dict[torch.device, torch.Tensor] = {A.device: A}  # one copy per device, made once

    @property
    def A(self) -> torch.Tensor:
        """The projection, float32 (L*D, d)."""
        return self._A

    def project(self, z: np.ndarray) -> np.ndarray:
        """z (P, d) or (d,) -> float32 prompts (P, L, D) or (L, D)."""
        z = np.asarray(z)
        if z.ndim not in (1, 2) or z.shape[-1] != self.intrinsic_dim:
            raise ValueError(f"z must be (P, {self.intrinsic_dim}) or ({self.intrinsic_dim},), got {z.shape}")
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
        with torch.no_grad():
            return self.project_torch(zt).numpy()

    def project_torch(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable z (..., d) -> (..., L, D) on z's device, in float32."""
        A = self._on_device.get(z.device)
        if A is None:
            A = self._on_device[z.device] = self._A.to(z.device)
        out = z.to(torch.float32) @ A.T  # (..., L*D)
        return out.reshape(*z.shape[:-1], self.prompt_length, self.width)


def layer_seed(seed: int, layer: int) -> int:
    """Seed of layer `layer`'s projection: a 64-bit word of SeedSequence(seed, spawn_key=(layer,)).

    This is numpy's `SeedSequence(seed).spawn(n)[layer]`, so seeds are independent across layers
    and do not depend on the number of layers.
    """
    word = np.random.SeedSequence(seed, spawn_key=(layer,)).generate_state(1, np.uint64)[0]
    return int(word) >> 1  # torch.manual_seed takes < 2**63 without wrapping


class DeepPromptSpace:
    """BBTv2 (Sun et al., EMNLP 2022, Sec. 3.1): one PromptSpace per layer, z_l -> A_l z_l.

    Layer l's A_l is drawn with `layer_seed(seed, l)` and scaled by layer_stds[l] (layer 0: the
    word-embedding std; layer l > 0: the std of the hidden states entering layer l, see
    `clipped_std`). Memory: n_layers * L * D * d float32 (2.4 GB at 24 x 50 x 1024 x 500).
    """

    def __init__(self, intrinsic_dim: int, prompt_length: int, width: int, layer_stds: Sequence[float], seed: int,
                 distribution: str = "normal", alpha: float = 1.0, sigma: float = 1.0):
        check(len(layer_stds) >= 1, "layer_stds", "needs one std per layer, got none")
        check(seed >= 0, "seed", f"must be >= 0, got {seed}")
        self.seed = int(seed)
        self.layers = [PromptSpace(intrinsic_dim, prompt_length, width, float(s), layer_seed(seed, l),
                                   distribution=distribution, alpha=alpha, sigma=sigma)
                       for l, s in enumerate(layer_stds)]
        self.intrinsic_dim, self.prompt_length, self.width = intrinsic_dim, prompt_length, width

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def project(self, layer: int, z: np.ndarray) -> np.ndarray:
        """Layer `layer`'s prompts: z (P, d) -> (P, L, D), or (d,) -> (L, D)."""
        return self.layers[layer].project(z)

    def assemble(self, zs: np.ndarray) -> np.ndarray:
        """One z per layer (n_layers, d) -> the deep prompt (n_layers, L, D), float32."""
        zs = np.asarray(zs)
        if zs.shape != (self.n_layers, self.intrinsic_dim):
            raise ValueError(f"zs must be ({self.n_layers}, {self.intrinsic_dim}), got {zs.shape}")
        return np.stack([space.project(z) for space, z in zip(self.layers, zs)])

    def population(self, layer: int, candidates: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        """BBTv2's divide and conquer: layer `layer` takes P candidates, the others hold `fixed`.

        candidates (P, d), fixed (n_layers, d) (its row `layer` is ignored) -> (P, n_layers, L, D).
        """
        candidates = np.asarray(candidates)
        if candidates.ndim != 2:
            raise ValueError(f"candidates must be (P, {self.intrinsic_dim}), got {candidates.shape}")
        base = self.assemble(fixed)  # (n_layers, L, D), projected once for the whole population
        out = np.repeat(base[None], len(candidates), axis=0)  # (P, n_layers, L, D)
        out[:, layer] = self.project(layer, candidates)
        return out


def clipped_std(values: np.ndarray, n_sigma: float = 3.0, rounds: int = 5) -> float:
    """Std of `values` after BBTv2's clipping (the reference deepbbt.py): `rounds` times, values
    farther than n_sigma standard deviations from the mean are clipped to that bound (np.clip:
    winsorised, not dropped) and mean and std recomputed; returns the population std (ddof=0) of
    the result, computed in float64. Rounds after the first that clips nothing change nothing.

    Until issue 17 raydapt dropped the outliers instead (astropy's sigma_clip), which gives a smaller
    std than the reference on heavy-tailed hidden states.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("clipped_std of an empty array")
    for _ in range(rounds):
        mu, sd = x.mean(), x.std()
        clipped = np.clip(x, mu - n_sigma * sd, mu + n_sigma * sd)
        if np.array_equal(clipped, x):
            break
        x = clipped
    return float(x.std())
