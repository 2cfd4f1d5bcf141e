r"""An analytic Gaussian-mixture prior and its exact posterior under a linear operator (DESIGN.md §1).

Prior  p_0 = Σ_k w_k N(μ_k, s² I) on image-shaped x ∈ R^d. Under the VP-SDE every marginal is again
a mixture, p_t = Σ_k w_k N(α μ_k, v I) with v = α² s² + σ², so the score is exact:

    ∇ log p_t(x) = Σ_k r_k(x) (α μ_k − x) / v,    r_k ∝ w_k exp(−‖x − α μ_k‖² / (2 v)).

For y = A x + η, η ~ N(0, σ_y² I), the posterior is the mixture Σ_k w'_k N(m_k, C) with

    C = (I/s² + AᵀA/σ_y²)⁻¹,   m_k = C (μ_k/s² + Aᵀy/σ_y²),   w'_k ∝ w_k N(y; A μ_k, s² AAᵀ + σ_y² I).

:func:`hard_mixture` builds the default test case: pairs μ = b ± n with n in (or, for an
invertible A, closest to) the null space of A and unequal weights, so the posterior is multi-modal
and its component weights are decided by the prior alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import load_weights, read_json, save_weights, write_json
from .errors import DeftError
from .operators import Operator
from .prior_interface import Prior
from .samplers import ScoreFn
from .sde import VPSDE, _expand


class GaussianMixturePrior(Prior):
    """Σ_k w_k N(μ_k, s² I) with the exact VP-SDE score; means (K, C, H, W), weights (K,)."""

    def __init__(self, means: Tensor, weights: Tensor, std: float, sde: VPSDE | None = None, name: str = "gmm") -> None:
        super().__init__()
        if means.ndim != 4 or weights.shape != means.shape[:1]:
            raise ValueError("means must be (K, C, H, W) and weights (K,)")
        self.register_buffer("means", means.double())
        self.register_buffer("log_weights", torch.log(weights.double() / weights.sum()))
        self.std = float(std)
        self.sde = sde or VPSDE()
        self.image_shape = tuple(means.shape[1:])  # type: ignore[assignment]
        self.name = name

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def responsibilities(self, x: Tensor, t: Tensor) -> Tensor:
        """r_k(x) of the marginal at time t, (B, K)."""
        alpha, var = self._marginal(t)
        mu = self.means.flatten(1)  # (K, d)
        diff = x.double().flatten(1)[:, None, :] - alpha[:, None, None] * mu[None]
        logits = self.log_weights[None] - diff.pow(2).sum(-1) / (2 * var[:, None])
        return torch.softmax(logits, dim=1)

    def _marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha = self.sde.alpha(t.double())
        return alpha, alpha**2 * self.std**2 + self.sde.sigma(t.double()) ** 2

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        alpha, var = self._marginal(t)
        r = self.responsibilities(x, t)  # (B, K)
        mean = (r @ self.means.flatten(1)).reshape(x.shape) * _expand(alpha, x)
        return ((mean - x.double()) / _expand(var, x)).to(x.dtype)

    def run_networks_with(self, adapt: Callable[[ScoreFn], ScoreFn]) -> None:
        """Nothing to adapt: the score is analytic and computed in float64."""

    def log_density(self, x: Tensor, t: Tensor) -> Tensor:
        """log p_t(x), (B,) — for checking the score against autograd."""
        alpha, var = self._marginal(t)
        d = x[0].numel()
        diff = x.double().flatten(1)[:, None, :] - alpha[:, None, None] * self.means.flatten(1)[None]
        logits = self.log_weights[None] - diff.pow(2).sum(-1) / (2 * var[:, None])
        return torch.logsumexp(logits, dim=1) - 0.5 * d * torch.log(2 * math.pi * var)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.image_shape), generator=generator, dtype=torch.float64)
        return (self.means.cpu()[k] + self.std * noise).float()

    def dataset(self, split: str) -> "MixtureSamples":
        """Prior samples addressed by (split, index), as a data set for amortised fine-tuning."""
        return MixtureSamples(self, split)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": "gaussian-mixture",
            "components": int(self.means.shape[0]),
            "std": self.std,
            "image_shape": list(self.image_shape),
        }

    def pixel_variance(self) -> float:
        """s² plus the spread of the component means about the mixture's per-channel mean, per pixel."""
        w = self.weights[:, None, None, None]
        channel_mean = (w * self.means).sum(0).mean(dim=(1, 2), keepdim=True)
        return self.std**2 + float((w * (self.means - channel_mean) ** 2).sum(0).mean())

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_weights({"means": self.means, "weights": self.weights}, folder / "model.safetensors")
        write_json(
            {
                "format": "gaussian-mixture",
                "name": self.name,
                "std": self.std,
                "sde": {"beta_min": self.sde.beta_min, "beta_max": self.sde.beta_max},
                "image_shape": list(self.image_shape),
            },
            folder / "config.json",
        )

    @classmethod
    def load(cls, folder: Path) -> "GaussianMixturePrior":
        config = read_json(folder / "config.json")
        tensors, _ = load_weights(folder / "model.safetensors")
        try:
            return cls(
                tensors["means"],
                tensors["weights"],
                float(config["std"]),
                VPSDE(**config["sde"]),
                config.get("name", folder.name),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DeftError(f"{folder}: invalid Gaussian-mixture prior ({exc})") from None


class MixtureSamples:
    """Deterministic samples of a mixture prior: image i of a split is drawn with its own seed."""

    SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, prior: GaussianMixturePrior, split: str, size: int = 1_000_000) -> None:
        self.prior, self.split_seed, self.size = prior, self.SPLIT_SEEDS[split], size

    def __len__(self) -> int:
        return self.size

    def batch(self, indices) -> Tensor:
        return torch.cat(
            [self.prior.sample(1, torch.Generator().manual_seed(3 * int(i) + self.split_seed)) for i in indices]
        )


@dataclass
class GaussianMixturePosterior:
    """Σ_k w'_k N(m_k, C): the exact posterior, with an exact sampler."""

    weights: Tensor  # (K,)
    means: Tensor  # (K, d)
    cov: Tensor  # (d, d)
    image_shape: tuple[int, ...]

    @property
    def mean(self) -> Tensor:
        """Posterior mean Σ_k w'_k m_k, image-shaped."""
        return (self.weights @ self.means).reshape(self.image_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.cov)
        z = torch.randn((n, self.cov.shape[0]), generator=generator, dtype=torch.float64)
        return (self.means[k] + z @ chol.T).reshape(n, *self.image_shape).float()

    def score(self, x: Tensor, t: Tensor, sde: VPSDE) -> Tensor:
        """Exact score of the posterior diffused to time t: Σ_k w'_k N(α m_k, α² C + σ² I).

        s_θ + h* with the exact h-transform h* = this − prior score; in the eigenbasis C = U Λ Uᵀ
        the covariance is U (α² Λ + σ²) Uᵀ.
        """
        lam, u = torch.linalg.eigh(self.cov)
        alpha = sde.alpha(t.double())[:, None]
        inv_diag = 1.0 / (alpha**2 * lam[None] + sde.sigma(t.double())[:, None] ** 2)  # (B, d)
        xr = x.double().flatten(1) @ u  # rotated samples (B, d)
        mr = self.means @ u  # rotated means (K, d)
        diff = alpha[:, None, :] * mr[None] - xr[:, None, :]  # (B, K, d)
        logits = torch.log(self.weights)[None] - 0.5 * (diff.pow(2) * inv_diag[:, None, :]).sum(-1)
        r = torch.softmax(logits, dim=1)
        score_rot = (r[:, :, None] * diff).sum(1) * inv_diag
        return (score_rot @ u.T).reshape(x.shape).to(x.dtype)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Exact posterior responsibilities of each component for samples x, (n, K)."""
        diff = x.double().flatten(1)[:, None, :] - self.means[None]
        prec = torch.linalg.inv(self.cov)
        maha = torch.einsum("nkd,de,nke->nk", diff, prec, diff)
        return torch.softmax(torch.log(self.weights)[None] - 0.5 * maha, dim=1)


def exact_posterior(prior: GaussianMixturePrior, operator: Operator, y: Tensor) -> GaussianMixturePosterior:
    """The exact posterior for a linear operator, from its dense matrix (small d only)."""
    a = operator.matrix(prior.image_shape)  # (m, d) float64
    d = a.shape[1]
    s2, sy2 = prior.std**2, operator.sigma**2
    if sy2 == 0:
        raise DeftError("the exact posterior needs measurement noise sigma > 0")
    yv = y.double().flatten()
    cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) / s2 + a.T @ a / sy2)
    cov = 0.5 * (cov + cov.T)
    mu = prior.means.cpu().flatten(1)
    means = (mu / s2 + (a.T @ yv / sy2)[None]) @ cov
    marg_cov = s2 * a @ a.T + sy2 * torch.eye(a.shape[0], dtype=torch.float64)
    resid = yv[None] - mu @ a.T
    maha = torch.einsum("km,mn,kn->k", resid, torch.linalg.inv(marg_cov), resid)
    weights = torch.softmax(prior.log_weights.cpu() - 0.5 * maha, dim=0)
    return GaussianMixturePosterior(weights, means, cov, prior.image_shape)


def null_direction(operator: Operator, image_shape: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    """A unit vector n that A maps (nearly) to zero: a random mix of the right-singular vectors of A
    with the smallest singular values (an exact null space for super-resolution and inpainting)."""
    a = operator.matrix(image_shape)
    d = a.shape[1]
    _, sing, vh = torch.linalg.svd(a, full_matrices=True)
    full = torch.zeros(d, dtype=torch.float64)
    full[: sing.numel()] = sing
    order = torch.argsort(full)
    k = max(1, d // 8)
    coeffs = torch.randn(k, generator=generator, dtype=torch.float64)
    n = coeffs @ vh[order[:k]]
    return (n / n.norm()).reshape(image_shape)


def hard_mixture(
    operator: Operator,
    image_shape: tuple[int, int, int],
    components: int = 4,
    std: float = 0.1,
    separation: float = 3.0,
    generator: torch.Generator | None = None,
) -> GaussianMixturePrior:
    """Pairs μ = b ± r·n (n from :func:`null_direction`, r = separation · s · √d / 2) with unequal weights.

    Bases b are smooth random images in [-0.6, 0.6]; weights decrease geometrically within and
    across pairs, so no two components are equally likely.
    """
    if components < 2 or components % 2:
        raise DeftError(f"--components must be an even number ≥ 2 (pairs b ± n), got {components}")
    g = generator or torch.Generator().manual_seed(0)
    c, h, w = image_shape
    means, weights = [], []
    radius = separation * std * math.sqrt(c * h * w) / 2
    for pair in range(components // 2):
        coarse = torch.rand((1, c, max(1, h // 4), max(1, w // 4)), generator=g, dtype=torch.float64) * 1.2 - 0.6
        base = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        n = null_direction(operator, image_shape, g)
        means += [base + radius * n, base - radius * n]
        w_pair = 0.5**pair
        weights += [0.7 * w_pair, 0.3 * w_pair]
    return GaussianMixturePrior(torch.stack(means), torch.tensor(weights, dtype=torch.float64), std)
