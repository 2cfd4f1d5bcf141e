"""The VP-SDE against closed forms."""

import math

import pytest
import torch

from deftcli.sde import VPSDE, reverse_time_grid


@pytest.fixture
def sde() -> VPSDE:
    return VPSDE()


def test_alpha_squared_plus_sigma_squared_is_one(sde):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(sde.alpha(t) ** 2 + sde.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)


def test_marginal_endpoints_and_log_alpha_closed_form(sde):
    assert float(sde.alpha(torch.tensor(0.0))) == 1.0 and float(sde.sigma(torch.tensor(0.0))) == 0.0
    one = torch.tensor(1.0, dtype=torch.float64)
    assert float(sde.log_alpha(one)) == pytest.approx(-0.25 * 19.9 - 0.05)
    assert float(sde.sigma(one)) == pytest.approx(math.sqrt(1 - math.exp(2 * (-0.25 * 19.9 - 0.05))))


def test_beta_drift_diffusion(sde):
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(sde.beta(t), torch.tensor([0.1, 10.05, 20.0]))
    x = torch.ones(3, 2, 2, 2)
    assert torch.allclose(sde.drift(x, t), -0.5 * sde.beta(t)[:, None, None, None] * x)
    assert torch.allclose(sde.diffusion(t) ** 2, sde.beta(t))


def test_alpha_solves_the_forward_mean_ode(sde):
    """d/dt log α = −½ β(t)  (the mean of dx = −½ β x dt)."""
    t = torch.linspace(0.05, 0.95, 10, dtype=torch.float64, requires_grad=True)
    (dlog,) = torch.autograd.grad(sde.log_alpha(t).sum(), t)
    assert torch.allclose(dlog, -0.5 * sde.beta(t.detach()))


def test_reverse_time_grid_endpoints_monotone_and_denser_near_data():
    grid = reverse_time_grid(200, eps=1e-3)
    assert len(grid) == 200
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(1 - 1e-3)
    steps = [b - a for a, b in zip(grid, grid[1:])]
    assert all(s > 0 for s in steps)
    assert steps[-1] < steps[0]  # s = √(linspace): small steps near t = ε
    assert grid[100] == pytest.approx(math.sqrt(0.999**2 * 100 / 199))


def test_tweedie_recovers_x0_for_a_gaussian_prior_with_exact_score(sde):
    """For p_0 = N(x0, s² I) the marginal is N(α x0, (α² s² + σ²) I); as s → 0, Tweedie returns x0."""
    x0 = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    alpha, sigma = sde.alpha(t)[:, None, None, None], sde.sigma(t)[:, None, None, None]
    x_t = alpha * x0 + sigma * torch.randn_like(x0)
    score = -(x_t - alpha * x0) / sigma**2  # exact score of N(α x0, σ² I)
    assert torch.allclose(sde.tweedie_x0(x_t, score, t), x0, atol=1e-10)


def test_perturb_matches_the_marginal(sde):
    x0 = torch.randn(2, 1, 3, 3)
    t = torch.tensor([0.2, 0.7])
    z = torch.randn_like(x0)
    expected = sde.alpha(t)[:, None, None, None] * x0 + sde.sigma(t)[:, None, None, None] * z
    assert torch.allclose(sde.perturb(x0, t, z), expected)


def test_discrete_ddpm_betas_map_to_the_continuous_schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sde = VPSDE.from_discrete_betas(betas)
    assert sde.beta_min == pytest.approx(0.1) and sde.beta_max == pytest.approx(20.0)
    with pytest.raises(ValueError):
        VPSDE.from_discrete_betas(torch.linspace(0, 1, 10) ** 2)
