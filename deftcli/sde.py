r"""The variance-preserving SDE (DESIGN.md §1), time t ∈ [0, 1] with t = 0 the data.

    β(t) = β0 + t (β1 − β0)
    log α(t) = −¼ t² (β1 − β0) − ½ t β0,      σ(t)² = 1 − α(t)²
    forward SDE   dx = −½ β(t) x dt + √β(t) dW,   marginal  x_t = α(t) x_0 + σ(t) ε

Samplers integrate the reverse SDE in reversed time s = 1 − t on :func:`reverse_time_grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) or scalar tensor so it broadcasts against an image batch."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


@dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE with a linear β schedule."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = β0 + t (β1 − β0)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """log α(t) = −¼ t² (β1 − β0) − ½ t β0."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        """Mean scale α(t) of the marginal x_t = α x_0 + σ ε."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Marginal standard deviation σ(t) = √(1 − α²), computed with expm1 for small t."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Forward drift f(x, t) = −½ β(t) x."""
        return -0.5 * _expand(self.beta(t), x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        """Forward diffusion coefficient g(t) = √β(t)."""
        return torch.sqrt(self.beta(t))

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t = α(t) x0 + σ(t) ε for given noise ε."""
        return _expand(self.alpha(t), x0) * x0 + _expand(self.sigma(t), x0) * noise

    def tweedie_x0(self, x_t: Tensor, score: Tensor, t: Tensor) -> Tensor:
        """Tweedie's posterior-mean estimate x̂0 = (x_t + σ(t)² s(x_t, t)) / α(t)."""
        return (x_t + _expand(self.sigma(t) ** 2, x_t) * score) / _expand(self.alpha(t), x_t)

    @classmethod
    def from_discrete_betas(cls, betas: Tensor) -> "VPSDE":
        """The continuous VP-SDE whose Euler discretisation is a DDPM schedule with linear betas.

        A DDPM with n steps and betas b_i ≈ β(t_i)/n gives β0 = n·b_1 and β1 = n·b_n
        (e.g. 1e-4 … 0.02 over 1000 steps → β 0.1 … 20).
        """
        n = betas.numel()
        if n < 2:
            raise ValueError("a discrete schedule needs at least two betas")
        diffs = betas[1:] - betas[:-1]
        if not torch.allclose(diffs, diffs.mean().expand_as(diffs), rtol=1e-3, atol=1e-9):
            raise ValueError("only linear beta schedules map onto the linear VP-SDE")
        return cls(beta_min=float(betas[0]) * n, beta_max=float(betas[-1]) * n)


def reverse_time_grid(n_points: int, eps: float = 1e-3) -> list[float]:
    r"""Reversed-time grid s_k = √(linspace(0, (1 − ε)², N)), k = 0 … N − 1.

    s = 1 − t, so s_0 = 0 is t = 1 (pure noise) and s_{N−1} = 1 − ε is t = ε. The square root puts
    more steps near the data end. N grid points give N − 1 Euler–Maruyama steps.
    """
    if n_points < 2:
        raise ValueError("the time grid needs at least two points")
    end = (1.0 - eps) ** 2
    return [math.sqrt(end * k / (n_points - 1)) for k in range(n_points)]
