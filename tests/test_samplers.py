"""The two samplers over a score function: Euler–Maruyama on the reverse SDE and denoise-and-re-noise with ζ."""

import torch

from deftcli.samplers import (
    GeneratorNoise,
    PerSampleNoise,
    ReplayedNoise,
    SharedBatchNoise,
    sample_renoise,
    sample_reverse_sde,
)
from deftcli.sde import VPSDE, reverse_time_grid

SDE = VPSDE()
MEAN, STD = 0.3, 0.5


def gaussian_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact score of x0 ~ N(MEAN, STD² I) at time t: −(x − α MEAN) / (α² STD² + σ²)."""
    alpha, sigma = SDE.alpha(t)[:, None, None, None], SDE.sigma(t)[:, None, None, None]
    return -(x - alpha * MEAN) / (alpha**2 * STD**2 + sigma**2)


def draw(kind: str, zeta: float, n: int = 4000, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    noise = GeneratorNoise(torch.Generator().manual_seed(seed + 1))
    if kind == "renoise":
        return sample_renoise(gaussian_score, SDE, x, reverse_time_grid(100), noise, zeta=zeta)
    return sample_reverse_sde(gaussian_score, SDE, x, reverse_time_grid(100), noise)


def test_without_fresh_noise_the_renoise_sampler_is_deterministic_given_its_start():
    start = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    grid = reverse_time_grid(20)
    a = sample_renoise(gaussian_score, SDE, start, grid, GeneratorNoise(torch.Generator().manual_seed(1)), zeta=0.0)
    b = sample_renoise(gaussian_score, SDE, start, grid, GeneratorNoise(torch.Generator().manual_seed(2)), zeta=0.0)
    assert torch.equal(a, b)
    c = sample_renoise(gaussian_score, SDE, start, grid, GeneratorNoise(torch.Generator().manual_seed(2)), zeta=0.5)
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


def test_the_loop_calls_back_after_every_step_and_adds_the_guidance_shift():
    grid = reverse_time_grid(6)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    steps = []
    plain = sample_reverse_sde(
        gaussian_score, SDE, x, grid, GeneratorNoise(torch.Generator().manual_seed(1)), callback=steps.append
    )
    assert [step.k for step in steps] == list(range(len(grid) - 1))
    assert torch.equal(steps[-1].x_next, plain) and torch.equal(steps[0].x, x)
    assert all(torch.equal(a.x_next, b.x) for a, b in zip(steps, steps[1:]))

    def shifted(score_fn, x, t):
        return score_fn(x, t), torch.full_like(x, 0.01)

    guided = sample_reverse_sde(
        gaussian_score, SDE, x, grid, GeneratorNoise(torch.Generator().manual_seed(1)), guidance=shifted
    )
    assert not torch.allclose(guided, plain)
    replayed = ReplayedNoise([step.xi for step in steps])
    again = sample_reverse_sde(gaussian_score, SDE, x, grid, replayed)
    assert torch.equal(again, plain)  # the same noise, replayed, gives the same trajectory


def test_each_share_of_a_shared_batch_draws_the_rows_a_single_process_would():
    whole = SharedBatchNoise(torch.Generator().manual_seed(4), total=6, rows=slice(0, 6))((6, 1, 2, 2), "cpu")
    first = SharedBatchNoise(torch.Generator().manual_seed(4), total=6, rows=slice(0, 3))((3, 1, 2, 2), "cpu")
    second = SharedBatchNoise(torch.Generator().manual_seed(4), total=6, rows=slice(3, 6))((3, 1, 2, 2), "cpu")
    assert torch.equal(torch.cat([first, second]), whole)


def test_per_sample_noise_does_not_depend_on_the_batch_a_sample_is_drawn_in():
    generators = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    together = PerSampleNoise(generators())((4, 1, 2, 2), "cpu")
    streams = generators()
    halves = torch.cat(
        [PerSampleNoise(streams[:2])((2, 1, 2, 2), "cpu"), PerSampleNoise(streams[2:])((2, 1, 2, 2), "cpu")]
    )
    assert torch.equal(together, halves)
