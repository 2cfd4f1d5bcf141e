r"""Samplers: small plain functions over a score function and the reversed-time grid.

A score function maps (x_t, t) → ∇ log p_t(x_t); wrappers (:func:`clip_denoised`,
:class:`deftcli.htransform.ConditionalScore`) adapt it, so the same Euler–Maruyama loop serves the
prior, the fine-tuned posterior and, with a guidance step, DPS.

Reverse SDE in reversed time s = 1 − t, on the grid s_k of :func:`deftcli.sde.reverse_time_grid`:

    x_{k+1} = x_k + [½ β x_k + β s(x_k, t_k)] Δs_k + √(β Δs_k) ξ_k,   t_k = 1 − s_k, ξ_k ~ N(0, I)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .sde import VPSDE, _expand

ScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class BatchSlice:
    """Rows ``rows`` of a batch of ``total``: the whole batch's noise is drawn from ``generator`` and
    only these rows are kept, so a process holding a share of a batch sees exactly the noise a
    single process would (data-parallel fine-tuning)."""

    generator: torch.Generator
    total: int
    rows: slice


NoiseSource = torch.Generator | Sequence[torch.Generator] | BatchSlice | None
"""One generator for the batch, one per row (results independent of batching), or a slice of a larger batch."""


def reverse_sde_step(sde: VPSDE, x: Tensor, t: Tensor, ds: float, score: Tensor, xi: Tensor) -> Tensor:
    """One Euler–Maruyama step of the reverse SDE from t backwards by ds with standard noise ξ."""
    beta = _expand(sde.beta(t), x)
    return x + (0.5 * beta * x + beta * score) * ds + torch.sqrt(beta * ds) * xi


def time_batch(s: float, like: Tensor) -> Tensor:
    """The forward time t = 1 − s as a (B,) tensor on x's device."""
    return torch.full((like.shape[0],), 1.0 - s, device=like.device, dtype=torch.float32)


def sample_reverse_sde(
    score_fn: ScoreFn,
    sde: VPSDE,
    x: Tensor,
    grid: Sequence[float],
    generator: NoiseSource = None,
    denoise_final: bool = False,
) -> Tensor:
    """Integrate the reverse SDE from x at t = 1 over ``grid``; return x at t = ε, or Tweedie's x̂0 there.

    Score evaluations: len(grid) − 1, plus one with ``denoise_final``.
    """
    with torch.no_grad():
        for k in range(len(grid) - 1):
            t = time_batch(grid[k], x)
            x = reverse_sde_step(sde, x, t, grid[k + 1] - grid[k], score_fn(x, t), standard_noise(x, generator))
        return denoise(score_fn, sde, x, grid[-1]) if denoise_final else x


def standard_noise(like: Tensor, source: NoiseSource) -> Tensor:
    """ξ ~ N(0, I) shaped like ``like`` (on its device), drawn from ``source``."""
    return gaussian(tuple(like.shape), source, like.device, like.dtype)


def gaussian(shape: tuple[int, ...], source: NoiseSource, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A standard normal tensor of ``shape`` drawn from a :data:`NoiseSource`."""
    if isinstance(source, BatchSlice):
        gen_device = source.generator.device
        return torch.randn((source.total, *shape[1:]), generator=source.generator, device=gen_device, dtype=dtype)[source.rows].to(device)
    if isinstance(source, (list, tuple)):
        if len(source) != shape[0]:
            raise ValueError(f"{len(source)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in source]).to(device)
    return torch.randn(shape, generator=source, device=device, dtype=dtype)


def noise_levels(sde: VPSDE, grid: Sequence[float], to_data: bool) -> list[tuple[float, float]]:
    """(α(t_k), σ(t_k)) at t_k = 1 − s_k of the grid, then (1, 0), the data itself, when ``to_data``.

    The spectral samplers (DDRM, DiffPIR) step from level k to level k + 1; ending at (1, 0) makes
    their last step return its estimate of x_0, which costs the same one extra evaluation as
    :func:`denoise`.
    """
    t = torch.tensor([1.0 - s for s in grid], dtype=torch.float64)
    levels = list(zip(sde.alpha(t).tolist(), sde.sigma(t).tolist()))
    return levels + [(1.0, 0.0)] if to_data else levels


def denoise(score_fn: ScoreFn, sde: VPSDE, x: Tensor, s: float) -> Tensor:
    """Tweedie's x̂0 of the final state (one more score evaluation)."""
    t = time_batch(s, x)
    with torch.no_grad():
        return sde.tweedie_x0(x, score_fn(x, t), t)


def clip_denoised(score_fn: ScoreFn, sde: VPSDE) -> ScoreFn:
    """Wrap a score so that its Tweedie estimate x̂0 is clipped to [-1, 1].

    s'(x, t) = (α clip(x̂0) − x) / σ²: a documented sampler option that stabilises weak priors; it
    changes the distribution being sampled, so it is off by default.
    """

    def clipped(x: Tensor, t: Tensor) -> Tensor:
        x0 = sde.tweedie_x0(x, score_fn(x, t), t).clamp(-1, 1)
        return (_expand(sde.alpha(t), x) * x0 - x) / _expand(sde.sigma(t) ** 2, x)

    return clipped
