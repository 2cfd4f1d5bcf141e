r"""DiffPIR (Zhu et al. 2023, "Denoising Diffusion Models for Plug-and-Play Image Restoration").

Half-quadratic splitting with the prior as the denoiser, one step from each level t of the time grid
to the next, t' (t = 1 − s_k, :func:`~deftcli.samplers.noise_levels`):

    x̂0      = (x_t + σ(t)² s_θ(x_t, t)) / α(t)                        Tweedie's estimate (the denoiser)
    x̂0^(y)  = argmin_z ‖y − A z‖² + ρ_t ‖z − x̂0‖²,    ρ_t = λ σ_y² / σ̄_t²,   σ̄_t = σ(t) / α(t)
    ε̂       = (x_t − α(t) x̂0^(y)) / σ(t)
    x_{t'}  = α(t') x̂0^(y) + σ(t') (√(1 − ζ) ε̂ + √ζ ε),                ε ~ N(0, I)

In the spectral coordinates of A = U S Vᵀ (:class:`~deftcli.operators.SingularValueDecomposition`) the
proximal step is diagonal: z_i = (s_i ȳ_i + ρ x̂_i) / (s_i² + ρ) with ȳ = Uᵀ y and x̂ = Vᵀ x̂0, and
x̂0^(y) = V z (z_i = x̂_i where s_i = 0). A small λ lets the measurement dominate; ζ is the share of fresh
noise in the re-noising (ζ = 1 ancestral, ζ = 0 deterministic). σ_y is on the model's [-1, 1] pixel
scale; the paper's and deepinv's σ_n is on [0, 1] images (σ_y / 2), and deepinv's proximal step weighs
ρ_t twice, so deepinv's λ is 2 × ours (tests/test_baselines.py runs deepinv's DiffPIR against ours).

The sampler starts from x ~ N(0, I) at t = 1 like every sampler here; with ``denoise_final`` its last step
goes to (α, σ) = (1, 0) and returns x̂0^(y) at t = ε. Score evaluations: one per step, N − 1 (+ 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .operators import SingularValueDecomposition
from .samplers import NoiseSampler, ScoreFn, noise_levels, noise_like, renoised, time_batch
from .sde import VPSDE


def proximal_step(svd: SingularValueDecomposition, y: Tensor, x0: Tensor, rho: float) -> Tensor:
    """x̂0^(y) = argmin_z ‖y − A z‖² + ρ ‖z − x̂0‖² = V((s ȳ + ρ x̂) / (s² + ρ)), ȳ = Uᵀ y, x̂ = Vᵀ x̂0."""
    spectral_x0 = svd.Vt(x0)
    s = svd.singular_values_like(x0)
    z = torch.where(s > 0, (s * svd.Ut(y) + rho * spectral_x0) / (s**2 + rho), spectral_x0)
    return svd.V(z).to(x0.dtype)


def diffpir_step(
    svd: SingularValueDecomposition,
    y: Tensor,
    sigma_y: float,
    x: Tensor,
    x0: Tensor,
    level: tuple[float, float],
    next_level: tuple[float, float],
    lam: float,
    zeta: float,
    noise: Tensor,
) -> Tensor:
    """x_{t'} from x_t and its denoised x̂0: the proximal step with ρ_t = λ σ_y² α² / σ², then re-noising to
    ``next_level`` = (α(t'), σ(t')) with the share ζ of fresh standard ``noise``."""
    alpha, sigma = level
    x0_y = proximal_step(svd, y, x0, lam * sigma_y**2 * alpha**2 / sigma**2)
    return renoised(x, x0_y, level, next_level, zeta, noise)


def sample_diffpir(
    score_fn: ScoreFn,
    sde: VPSDE,
    svd: SingularValueDecomposition,
    y: Tensor,
    sigma_y: float,
    x: Tensor,
    grid: Sequence[float],
    lam: float,
    zeta: float,
    noise: NoiseSampler,
    denoise_final: bool,
) -> Tensor:
    """DiffPIR from x at t = 1 over the reversed-time ``grid``; x̂0^(y) at t = ε with ``denoise_final``, else x_ε."""
    levels = noise_levels(sde, grid, denoise_final)
    with torch.no_grad():
        for k in range(len(levels) - 1):
            t = time_batch(grid[k], x)
            x0 = sde.tweedie_x0(x, score_fn(x, t), t)
            x = diffpir_step(svd, y, sigma_y, x, x0, levels[k], levels[k + 1], lam, zeta, noise_like(x, noise))
    return x
