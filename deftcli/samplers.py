r"""Samplers: small plain functions over a score function, a noise sampler and the reversed-time grid.

A score function maps (x_t, t) → ∇ log p_t(x_t); wrappers (:func:`clip_denoised`,
:class:`deftcli.htransform.ConditionalScore`) adapt it, so one Euler–Maruyama loop,
:func:`sample_reverse_sde`, serves the prior, the fine-tuned posterior, DPS (through its per-step
``guidance`` hook) and the fine-tuning rollout (through its per-step ``callback``). A noise sampler
(:class:`NoiseSampler`) draws the standard normal ξ of every step, so where the randomness comes from
(one generator, one per sample, a share of a larger batch) is the caller's choice, not the loop's.

Two samplers share the reversed-time grid s_k of :func:`deftcli.sde.reverse_time_grid`
(t_k = 1 − s_k, ξ_k ~ N(0, I)):

- ``sde``: Euler–Maruyama on the reverse SDE (DESIGN.md §1), the process fine-tuning controls,

      x_{k+1} = x_k + [½ β x_k + β s(x_k, t_k)] Δs_k + √(β Δs_k) ξ_k;

- ``renoise``: denoise, then re-noise to the next time (the DDIM family in DiffPIR's
  parametrisation): with x̂0 = Tweedie's estimate at (x_k, t_k) and ε̂ = (x_k − α_k x̂0)/σ_k,

      x_{k+1} = α_{k+1} x̂0 + σ_{k+1} (√(1 − ζ) ε̂ + √ζ ξ_k).

  ζ = 0 is deterministic DDIM; ζ = ζ_k^DDPM = (1 − α_k²/α_{k+1}²) / σ_k² per step would be DDPM's
  ancestral sampler; a larger ζ puts more fresh noise into every step than the reverse process does,
  which pulls samples towards the denoiser's estimates (and narrows their spread); ζ = 1 forgets
  x_k except through x̂0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from .sde import VPSDE, _expand

ScoreFn = Callable[[Tensor, Tensor], Tensor]
SamplerKind = Literal["sde", "renoise"]


class NoiseSampler(Protocol):
    """Draws standard normal noise: ``noise(shape, device, dtype)`` → a tensor of ``shape`` on ``device``."""

    def __call__(
        self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor: ...


@dataclass(frozen=True)
class GeneratorNoise:
    """The whole batch's noise from one generator (``None``: torch's global one)."""

    generator: torch.Generator | None = None

    def __call__(
        self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class PerSampleNoise:
    """Row b's noise from ``generators[b]``: a sample's noise does not depend on the batch it is drawn in."""

    generators: Sequence[torch.Generator]

    def __call__(
        self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        if len(self.generators) != shape[0]:
            raise ValueError(f"{len(self.generators)} generators for a batch of {shape[0]}")
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in self.generators]
        ).to(device)


@dataclass(frozen=True)
class SharedBatchNoise:
    """Rows ``rows`` of a batch of ``total``: the whole batch's noise is drawn from ``generator`` and only
    these rows are kept, so a process holding a share of a batch sees exactly the noise a single process
    would (data-parallel fine-tuning)."""

    generator: torch.Generator
    total: int
    rows: slice

    def __call__(
        self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        full = torch.randn(
            (self.total, *shape[1:]), generator=self.generator, device=self.generator.device, dtype=dtype
        )
        return full[self.rows].to(device)


class ReplayedNoise:
    """Noise drawn before: the i-th call returns ``draws[i]`` (each already of the shape asked for)."""

    def __init__(self, draws: Sequence[Tensor]) -> None:
        self._draws = iter(draws)

    def __call__(
        self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        draw = next(self._draws)
        if tuple(draw.shape) != tuple(shape):
            raise ValueError(f"replayed noise of shape {tuple(draw.shape)} for a draw of {tuple(shape)}")
        return draw.to(device=device, dtype=dtype)


def noise_like(x: Tensor, noise: NoiseSampler) -> Tensor:
    """ξ ~ N(0, I) shaped like ``x``, on its device and of its dtype."""
    return noise(tuple(x.shape), x.device, x.dtype)


def reverse_sde_step(sde: VPSDE, x: Tensor, t: Tensor, ds: float, score: Tensor, xi: Tensor) -> Tensor:
    """One Euler–Maruyama step of the reverse SDE from t backwards by ds with standard noise ξ."""
    beta = _expand(sde.beta(t), x)
    return x + (0.5 * beta * x + beta * score) * ds + torch.sqrt(beta * ds) * xi


def time_batch(s: float, like: Tensor) -> Tensor:
    """The forward time t = 1 − s as a (B,) tensor on x's device."""
    return torch.full((like.shape[0],), 1.0 - s, device=like.device, dtype=torch.float32)


@dataclass
class ReverseStep:
    """What one step of :func:`sample_reverse_sde` used and made: step k from x at t (by Δs = ``ds``) with
    the score s(x, t) and the noise ξ, to ``x_next``; given to the loop's ``callback``."""

    k: int
    x: Tensor
    t: Tensor
    ds: float
    score: Tensor
    xi: Tensor
    x_next: Tensor


class Guidance(Protocol):
    """A per-step hook of :func:`sample_reverse_sde`: evaluates the score at (x, t) itself (with autograd where
    it needs it) and returns it with a shift that the loop adds to the step's result."""

    def __call__(self, score_fn: ScoreFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]: ...


def sample_reverse_sde(
    score_fn: ScoreFn,
    sde: VPSDE,
    x: Tensor,
    grid: Sequence[float],
    noise: NoiseSampler,
    denoise_final: bool = False,
    guidance: Guidance | None = None,
    callback: Callable[[ReverseStep], None] | None = None,
    keep_graph: bool = False,
) -> Tensor:
    """Integrate the reverse SDE from x at t = 1 over ``grid``; return x at t = ε, or Tweedie's x̂0 there.

    Per step k: x_{k+1} = EM step with s(x_k, t_k) (+ the ``guidance`` shift), then ``callback(step)``.
    Score evaluations: len(grid) − 1, plus one with ``denoise_final``. No autograd graph outlives a step,
    unless ``keep_graph`` (backpropagation through the whole trajectory).
    """
    with contextlib.nullcontext() if keep_graph else torch.no_grad():
        for k in range(len(grid) - 1):
            t = time_batch(grid[k], x)
            ds = grid[k + 1] - grid[k]
            if guidance is None:
                score, shift = score_fn(x, t), None
            else:
                score, shift = guidance(score_fn, x, t)
            xi = noise_like(x, noise)
            x_next = reverse_sde_step(sde, x, t, ds, score, xi)
            if shift is not None:
                x_next = x_next + shift
            if callback is not None:
                callback(ReverseStep(k, x, t, ds, score, xi, x_next))
            x = x_next
        return denoise(score_fn, sde, x, grid[-1]) if denoise_final else x


def renoised(
    x: Tensor, x0: Tensor, level: tuple[float, float], next_level: tuple[float, float], zeta: float, xi: Tensor
) -> Tensor:
    """x at the next level from x_t and an estimate x̂0 of x_0: α' x̂0 + σ' (√(1 − ζ) ε̂ + √ζ ξ), ε̂ = (x_t − α x̂0) / σ,
    for the levels (α, σ) → (α', σ') (:func:`noise_levels`)."""
    (alpha, sigma), (next_alpha, next_sigma) = level, next_level
    eps = (x - alpha * x0) / sigma
    return next_alpha * x0 + next_sigma * (math.sqrt(1.0 - zeta) * eps + math.sqrt(zeta) * xi)


def sample_renoise(
    score_fn: ScoreFn,
    sde: VPSDE,
    x: Tensor,
    grid: Sequence[float],
    noise: NoiseSampler,
    denoise_final: bool = False,
    zeta: float = 1.0,
) -> Tensor:
    """The ``renoise`` sampler (module docstring) from x at t = 1 over ``grid``: x at t = ε, or, with
    ``denoise_final``, one more step to the data level (α, σ) = (1, 0), which returns Tweedie's x̂0 at t = ε.

    Score evaluations: len(grid) − 1, plus one with ``denoise_final``; the same as :func:`sample_reverse_sde`.
    """
    if not 0.0 <= zeta <= 1.0:
        raise ValueError(f"the re-noising fraction ζ must lie in [0, 1], got {zeta}")
    levels = noise_levels(sde, grid, denoise_final)
    with torch.no_grad():
        for k in range(len(levels) - 1):
            t = time_batch(grid[k], x)
            x0 = sde.tweedie_x0(x, score_fn(x, t), t)
            x = renoised(x, x0, levels[k], levels[k + 1], zeta, noise_like(x, noise))
    return x


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
