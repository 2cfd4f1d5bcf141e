"""The two samplers over a score function: Euler–Maruyama on the reverse SDE and denoise-and-re-noise with ζ."""

import torch

from deftcli.samplers import run_sampler, sample_renoise
from deftcli.sde import VPSDE, reverse_time_grid

SDE = VPSDE()
MEAN, STD = 0.3, 0.5


def gaussian_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact score of x0 ~ N(MEAN, STD² I) at time t: −(x − α MEAN) / (α² STD² + σ²)."""
    alpha, sigma = SDE.alpha(t)[:, None, None, None], SDE.sigma(t)[:, None, None, None]
    return -(x - alpha * MEAN) / (alpha**2 * STD**2 + sigma**2)


def draw(kind: str, zeta: float, n: int = 4000, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    return run_sampler(kind, gaussian_score, SDE, x, reverse_time_grid(100), zeta, torch.Generator().manual_seed(seed + 1))


def test_without_fresh_noise_the_renoise_sampler_is_deterministic_given_its_start():
    start = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    grid = reverse_time_grid(20)
    a = sample_renoise(gaussian_score, SDE, start, grid, 0.0, torch.Generator().manual_seed(1))
    b = sample_renoise(gaussian_score, SDE, start, grid, 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sample_renoise(gaussian_score, SDE, start, grid, 0.5, torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c)


def test_with_the_exact_score_both_samplers_draw_the_prior_and_full_re_noising_narrows_it():
    for kind, zeta in (("sde", 0.0), ("renoise", 0.0)):
        x = draw(kind, zeta)
        assert abs(float(x.mean()) - MEAN) < 0.03, kind
        assert abs(float(x.std()) - STD) < 0.03, kind
    narrowed = draw("renoise", 1.0)
    assert abs(float(narrowed.mean()) - MEAN) < 0.03
    assert float(narrowed.std()) < 0.8 * STD  # ζ = 1 pulls every sample towards the denoiser's estimate


def test_the_fresh_noise_fraction_must_lie_in_the_unit_interval():
    import pytest

    with pytest.raises(ValueError, match="ζ"):
        draw("renoise", 1.5, n=2)
