r"""DDRM (Kawar et al. 2022, "Denoising Diffusion Restoration Models").

DDRM samples in the spectral coordinates of A = U S Vᵀ (:class:`~deftcli.operators.SingularValueDecomposition`),
on the variance-exploding view of the VP-SDE: the state is x̄ = Vᵀ x_t / α(t), whose noise level is
σ̄(t) = σ(t) / α(t). The measurement becomes ȳ_i = (Uᵀ y)_i / s_i, a look at x̄_0,i with noise std
τ_i = σ_y / s_i (τ_i = ∞ where s_i = 0: no information). With c = √(1 − η²), the step from the level
σ̄' = σ̄(t_k) to σ̄ = σ̄(t_{k+1}), with the denoised x̄θ = Vᵀ x̂0(α(t_k) V x̄, t_k) (Tweedie's estimate of the
prior), draws every coordinate from

    τ_i = ∞:   N(x̄θ_i + c σ̄ (x̄_i − x̄θ_i) / σ̄',                       η² σ̄²)
    σ̄ < τ_i:   N(x̄θ_i + c σ̄ (ȳ_i − x̄θ_i) / τ_i,                         η² σ̄²)
               (= x̄θ_i + c σ̄ ((Uᵀ y)_i − s_i x̄θ_i) / σ_y, as computed)
    σ̄ ≥ τ_i:   N((1 − η_b) x̄θ_i + η_b ȳ_i,                              σ̄² − η_b² τ_i²)

and the start at t = 1 from N(ȳ_i, σ̄(1)² − τ_i²) where τ_i ≤ σ̄(1), N(0, σ̄(1)²) elsewhere. The paper's
η = 0.85, η_b = 1 are the defaults. Noise in spectral coordinates is Vᵀ of standard image noise drawn from
the sampler's noise (for a Fourier basis it keeps the Hermitian symmetry, so images stay real); the start
uses the same first draw that the other samplers take as x at t = 1.

The levels are those of the reversed-time grid (:func:`~deftcli.samplers.noise_levels`); with
``denoise_final`` the last step goes to σ̄ = 0 and returns x_0 = V x̄ (x̂0 where the measurement says
nothing more), otherwise the VP state α(ε) V x̄ at t = ε. Score evaluations: one per step, N − 1 (+ 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .operators import SingularValueDecomposition
from .samplers import NoiseSampler, ScoreFn, noise_levels, noise_like, time_batch
from .sde import VPSDE


def spectral_measurement(
    svd: SingularValueDecomposition, y: Tensor, sigma_y: float, like: Tensor
) -> tuple[Tensor, Tensor]:
    """ȳ = (Uᵀ y) / s and its noise std τ = σ_y / s in spectral coordinates (ȳ = 0, τ = ∞ where s = 0)."""
    s = svd.singular_values_like(like)
    observed = s > 0
    safe_s = torch.where(observed, s, torch.ones_like(s))
    y_bar = svd.Ut(y) / safe_s
    tau = torch.where(observed, sigma_y / safe_s, torch.full_like(s, math.inf))
    return y_bar, tau


def ddrm_start(y_bar: Tensor, tau: Tensor, sigma_bar: float, noise: Tensor) -> Tensor:
    """x̄ at the first level: N(ȳ, σ̄² − τ²) where τ ≤ σ̄, N(0, σ̄²) elsewhere; ``noise`` standard, spectral."""
    pinned = tau <= sigma_bar
    return torch.where(pinned, y_bar + torch.sqrt((sigma_bar**2 - tau**2).clamp_min(0)) * noise, sigma_bar * noise)


def ddrm_step(
    state: Tensor,
    x0_bar: Tensor,
    y_bar: Tensor,
    tau: Tensor,
    sigma_from: float,
    sigma_to: float,
    eta: float,
    eta_b: float,
    noise: Tensor,
) -> Tensor:
    """One DDRM step of the spectral state x̄ from σ̄' = ``sigma_from`` to σ̄ = ``sigma_to`` (the module's rules)."""
    c = math.sqrt(1 - eta**2)
    unobserved = torch.isinf(tau)
    pinned = tau <= sigma_to
    safe_tau = torch.where(unobserved, torch.ones_like(tau), tau).clamp_min(torch.finfo(tau.dtype).tiny)
    free = x0_bar + c * sigma_to * (state - x0_bar) / sigma_from
    guided = x0_bar + c * sigma_to * (y_bar - x0_bar) / safe_tau
    mean = torch.where(pinned, (1 - eta_b) * x0_bar + eta_b * y_bar, torch.where(unobserved, free, guided))
    pinned_std = torch.sqrt((sigma_to**2 - eta_b**2 * tau**2).clamp_min(0))
    std = torch.where(pinned, pinned_std, torch.full_like(tau, eta * sigma_to))
    return mean + std * noise


def sample_ddrm(
    score_fn: ScoreFn,
    sde: VPSDE,
    svd: SingularValueDecomposition,
    y: Tensor,
    sigma_y: float,
    x: Tensor,
    grid: Sequence[float],
    eta: float,
    eta_b: float,
    noise: NoiseSampler,
    denoise_final: bool,
) -> Tensor:
    """DDRM over the reversed-time ``grid``; ``x`` is the standard image noise of the start at t = 1."""
    levels = noise_levels(sde, grid, denoise_final)
    sigma_bars = [sigma / alpha for alpha, sigma in levels]
    y_bar, tau = spectral_measurement(svd, y, sigma_y, x)
    state = ddrm_start(y_bar, tau, sigma_bars[0], svd.Vt(x))
    with torch.no_grad():
        for k in range(len(levels) - 1):
            t = time_batch(grid[k], x)
            x_t = levels[k][0] * svd.V(state).to(x.dtype)
            x0_bar = svd.Vt(sde.tweedie_x0(x_t, score_fn(x_t, t), t))
            spectral_noise = svd.Vt(noise_like(x, noise))
            state = ddrm_step(state, x0_bar, y_bar, tau, sigma_bars[k], sigma_bars[k + 1], eta, eta_b, spectral_noise)
    return levels[-1][0] * svd.V(state).to(x.dtype)
