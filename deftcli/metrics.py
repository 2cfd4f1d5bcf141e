"""How close samples are: to the truth (PSNR, SSIM), to the measurement (the data residual), to a reference
sample set (a sliced Wasserstein-2 distance)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .images import to_unit
from .operators import Operator

PROJECTIONS = 256


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image PSNR in dB of [-1, 1] images, computed on [0, 1]."""
    return peak_signal_noise_ratio(to_unit(x), to_unit(ref), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image SSIM of [-1, 1] images, computed on [0, 1] (Gaussian window 11, σ 1.5)."""
    return structural_similarity_index_measure(to_unit(x), to_unit(ref), data_range=1.0, reduction="none")


def data_residual(operator: Operator, x: Tensor, y: Tensor) -> Tensor:
    """‖A x − y‖ / √m per sample: about σ_y for a sample consistent with the measurement."""
    return (operator.A(x) - y).flatten(1).norm(dim=1) / y[0].numel() ** 0.5


def sliced_w2(a: Tensor, b: Tensor, generator: torch.Generator, projections: int = PROJECTIONS) -> float:
    """√(mean over random unit directions θ of W2²(θᵀa, θᵀb)), for equal-size sample sets."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    dirs = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = torch.sort(a @ dirs, dim=0).values, torch.sort(b @ dirs, dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())
