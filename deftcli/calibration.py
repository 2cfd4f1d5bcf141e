r"""Coverage of sample-based credible intervals: can a sampler's spread be trusted as an error bar?

A sampler gives k samples x⁽¹⁾ … x⁽ᵏ⁾ of p(x | y) per image; x* is the truth. Everything is per
pixel (one channel of one pixel), with the order statistics x₍₁₎ ≤ … ≤ x₍ₖ₎ of its k values.

- **Quantiles** (Weibull's convention, Hyndman & Fan type 6, numpy's ``method="weibull"``): Q(q) sits
  at the 1-based position h = q (k + 1), linearly interpolated between x₍⌊h⌋₎ and x₍⌈h⌉₎; it is
  defined for 1 ≤ h ≤ k.
- **Central credible interval** at nominal level p: I_p = [Q((1 − p)/2), Q((1 + p)/2)], between the
  positions a = (1 − p)(k + 1)/2 and b = (1 + p)(k + 1)/2.
- **Why this convention.** When x* and the k samples are exchangeable — x* drawn from the same
  posterior, as when x ~ p(x), y ~ p(y | x) and the samples come from the exact p(x | y) — the rank of
  x* among the k + 1 values is uniform on {1, …, k + 1}, so P(x₍ᵢ₎ ≤ x* ≤ x₍ⱼ₎) = (j − i)/(k + 1). With
  integer a (e.g. k = 19 for 50 %, 80 % and 90 %) I_p covers with probability (b − a)/(k + 1) = p
  exactly; otherwise I_p lies between [x₍⌈a⌉₎, x₍⌊b⌋₎] and [x₍⌊a⌋₎, x₍⌈b⌉₎], so its coverage lies between
  (⌊b⌋ − ⌈a⌉)/(k + 1) and (⌈b⌉ − ⌊a⌋)/(k + 1) (and is exactly p for a uniform marginal).
- **Levels that k cannot reach.** The widest central interval [x₍₁₎, x₍ₖ₎] covers (k − 1)/(k + 1), so
  I_p needs a ≥ 1, i.e. k ≥ (1 + p)/(1 − p): k ≥ 3 for 50 %, k ≥ 9 for 80 %, k ≥ 19 for 90 %
  (:func:`minimum_samples`). Below that the level is reported as unavailable (NaN per image, null in
  JSON), not as the coverage of [x₍₁₎, x₍ₖ₎], which would under-cover by construction.
- **Per image:** the coverage c_p = fraction of pixels with x* ∈ I_p, the mean width of I_p over its
  pixels (in the model's [-1, 1] pixel scale), and the one-std fraction: pixels with |x* − x̄| ≤ s,
  x̄ and s the per-pixel sample mean and standard deviation (ddof 1, as in deft's std maps). Averages
  are plain means over images.
- **The one-std fraction's reference.** For a Gaussian marginal and exchangeable x*,
  (x* − x̄)/(s √(1 + 1/k)) is Student-t with k − 1 degrees of freedom, so the expected fraction is
  P(|t_{k−1}| ≤ √(k/(k + 1))) (:func:`gaussian_within_one_std`): 68.3 % as k → ∞, 56.3 % at k = 4.
  Unlike the coverage, whose nominal value holds for any posterior, this reference assumes Gaussian
  marginals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from scipy.special import stdtr
from torch import Tensor

from .images import atomic_write

LEVELS = (0.5, 0.8, 0.9)
"""The headline nominal levels."""
CURVE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The nominal levels of a calibration curve (they include :data:`LEVELS`)."""

_EPS = 1e-9


def minimum_samples(level: float) -> int:
    """The smallest k whose central interval reaches ``level``: k ≥ (1 + p)/(1 − p)."""
    return math.ceil((1 + level) / (1 - level) - _EPS)


def available(level: float, k: int) -> bool:
    return k >= minimum_samples(level)


def quantile(ordered: Tensor, q: float) -> Tensor:
    """Q(q) of sorted samples (n, k, …) along dim 1, Weibull's convention (position q (k + 1), 1-based)."""
    k = ordered.shape[1]
    h = q * (k + 1)
    if not 1 - _EPS <= h <= k + _EPS:
        raise ValueError(f"the {q:g} quantile of {k} samples is outside the order statistics (needs 1 ≤ q (k+1) ≤ k)")
    h = min(max(h, 1.0), float(k))
    below = math.floor(h)
    frac = h - below
    lower, upper = ordered[:, below - 1], ordered[:, min(below, k - 1)]
    return lower + frac * (upper - lower)


def per_image_calibration(samples: Tensor, truth: Tensor, levels: Sequence[float] = CURVE_LEVELS) -> dict[str, Tensor]:
    """Per-image coverage and mean width of I_p at each level, and the one-std fraction.

    ``samples`` (n, k, C, H, W); ``truth`` (n, C, H, W), or (n, T, C, H, W) for T truths judged against
    the same k samples (several draws of x* from one posterior). Returns ``coverage`` and ``mean_width``
    (n, L), NaN at levels that k cannot reach, and ``within_one_std`` (n,), NaN for k < 2.
    """
    if truth.ndim == samples.ndim - 1:
        truth = truth.unsqueeze(1)
    if truth.shape[0] != samples.shape[0] or truth.shape[2:] != samples.shape[2:]:
        raise ValueError(f"samples {tuple(samples.shape)} and truth {tuple(truth.shape)} do not match")
    n, k = samples.shape[:2]
    s, x = samples.detach().double().cpu(), truth.detach().double().cpu()
    ordered = s.sort(dim=1).values
    coverage = torch.full((n, len(levels)), math.nan, dtype=torch.float64)
    width = coverage.clone()
    for i, level in enumerate(levels):
        if available(level, k):
            lower, upper = quantile(ordered, (1 - level) / 2)[:, None], quantile(ordered, (1 + level) / 2)[:, None]
            coverage[:, i] = ((x >= lower) & (x <= upper)).flatten(1).double().mean(1)
            width[:, i] = (upper - lower).flatten(1).mean(1)
    within = torch.full((n,), math.nan, dtype=torch.float64)
    if k > 1:
        within = ((x - s.mean(1, keepdim=True)).abs() <= s.std(1, keepdim=True)).flatten(1).double().mean(1)
    return {"coverage": coverage, "mean_width": width, "within_one_std": within}


def gaussian_within_one_std(k: int) -> float | None:
    """P(|x* − x̄| ≤ s) for a Gaussian marginal and exchangeable x*: P(|t_{k−1}| ≤ √(k/(k + 1)))."""
    return None if k < 2 else float(2 * stdtr(k - 1, math.sqrt(k / (k + 1))) - 1)


def _number(value: Tensor) -> float | None:
    return None if math.isnan(float(value)) else round(float(value), 4)


def summarise(per_image: Mapping[str, Tensor], k: int, levels: Sequence[float] = CURVE_LEVELS) -> dict[str, Any]:
    """Means over images of :func:`per_image_calibration`'s figures, keyed by level (null where unavailable)."""
    return {
        "k": k,
        "widest_level": round((k - 1) / (k + 1), 4),
        "coverage": {f"{p:g}": _number(per_image["coverage"][:, i].mean()) for i, p in enumerate(levels)},
        "mean_width": {f"{p:g}": _number(per_image["mean_width"][:, i].mean()) for i, p in enumerate(levels)},
        "within_one_std": _number(per_image["within_one_std"].mean()),
        "within_one_std_gaussian": None if k < 2 else round(gaussian_within_one_std(k), 4),
    }


def per_image_lists(per_image: Mapping[str, Tensor], levels: Sequence[float] = CURVE_LEVELS) -> dict[str, Any]:
    """:func:`per_image_calibration`'s figures as JSON lists (null where unavailable), keyed by level."""

    def column(values: Tensor) -> list[float | None]:
        return [_number(v) for v in values]

    return {
        "coverage": {f"{p:g}": column(per_image["coverage"][:, i]) for i, p in enumerate(levels)},
        "mean_width": {f"{p:g}": column(per_image["mean_width"][:, i]) for i, p in enumerate(levels)},
        "within_one_std": column(per_image["within_one_std"]),
    }


def widest_headline_level(k: int) -> float | None:
    """The highest of :data:`LEVELS` that k samples reach (None below k = 3)."""
    return max((p for p in LEVELS if available(p, k)), default=None)


def unavailable_note(k: int) -> str | None:
    """One line for a k too small for some of :data:`LEVELS`, suggesting the -k that reaches them all."""
    missing = [p for p in LEVELS if not available(p, k)]
    if not missing:
        return None
    needs = ", ".join(f"{p:.0%} needs k ≥ {minimum_samples(p)}" for p in missing)
    levels = ", ".join(f"{p:.0%}" for p in missing)
    return (
        f"with {k} samples per image a central interval reaches at most {(k - 1) / (k + 1):.0%}, so coverage at "
        f"{levels} is reported as null ({needs}; pass -k {minimum_samples(max(LEVELS))} for all)"
    )


PLOT_SIZE = 520
PLOT_MARGIN = (64, 40, 24, 56)  # left, top, right, bottom
LEGEND_ROW = 18
PLOT_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


Curves = Mapping[str, Mapping[str, float | None]]
"""Label → :func:`summarise`'s ``coverage`` (level → coverage, None where unavailable)."""


def calibration_plot(curves: Curves, title: str = "coverage of central credible intervals") -> Image.Image:
    """Nominal level (x) against empirical coverage (y), one line per curve, the diagonal dashed.

    Unavailable levels are left out of a curve's line; the legend is below the axes, clear of every curve.
    """
    img = Image.new("RGB", (PLOT_SIZE, PLOT_SIZE + LEGEND_ROW * len(curves) + 8), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    left, top, right, bottom = PLOT_MARGIN
    side = PLOT_SIZE - left - right, PLOT_SIZE - top - bottom

    def point(nominal: float, empirical: float) -> tuple[float, float]:
        return left + nominal * side[0], top + (1 - empirical) * side[1]

    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        x, y = point(tick, tick)
        draw.line([point(tick, 0), point(tick, 1)], fill="#e6e6e6")
        draw.line([point(0, tick), point(1, tick)], fill="#e6e6e6")
        draw.text((x, top + side[1] + 6), f"{tick:.0%}", fill="black", font=font, anchor="mt")
        draw.text((left - 6, y), f"{tick:.0%}", fill="black", font=font, anchor="rm")
    draw.rectangle([point(0, 1), point(1, 0)], outline="black")
    for step in range(0, 40, 2):  # the diagonal, dashed
        draw.line([point(step / 40, step / 40), point((step + 1) / 40, (step + 1) / 40)], fill="#808080", width=1)
    draw.text((PLOT_SIZE / 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text((left + side[0] / 2, PLOT_SIZE - 26), "nominal level", fill="black", font=font, anchor="mt")
    draw.text((8, top + side[1] / 2), "empirical", fill="black", font=font, anchor="lm")
    for index, (label, coverage) in enumerate(curves.items()):
        colour = PLOT_COLOURS[index % len(PLOT_COLOURS)]
        points = [point(float(p), c) for p, c in coverage.items() if c is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = PLOT_SIZE + LEGEND_ROW * index
        draw.line([(left, legend_y), (left + 20, legend_y)], fill=colour, width=2)
        draw.ellipse([left + 7, legend_y - 3, left + 13, legend_y + 3], fill=colour)
        draw.text((left + 28, legend_y), label, fill="black", font=font, anchor="lm")
    return img


def save_calibration_plot(curves: Curves, path: Path, title: str | None = None) -> Path:
    """Write :func:`calibration_plot` as a PNG (atomically)."""
    img = calibration_plot(curves, *(title,) if title else ())
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))
    return Path(path)
