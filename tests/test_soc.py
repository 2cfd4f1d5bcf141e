"""The SOC rollout, the log-RND terms and the VarGrad loss (DESIGN.md §1)."""

import math

import pytest
import torch
from torch import nn

from deftcli.htransform import HTransform, HTransformConfig, guidance_inputs
from deftcli.operators import create
from deftcli.samplers import GeneratorNoise, noise_like, reverse_sde_step, time_batch
from deftcli.sde import VPSDE, reverse_time_grid
from deftcli.soc import (
    accumulate_vargrad_gradient,
    backprop_soc_gradient,
    data_term,
    gradient_steps,
    rollout,
    step_terms,
    vargrad_loss,
    vargrad_weights,
)
from deftcli.specs import HNetSpec


class StandardNormalPrior(nn.Module):
    """p_0 = N(0, I) is stationary under the VP-SDE: the score is −x at every t."""

    sde = VPSDE()
    image_shape = (1, 2, 2)

    def score(self, x, t):
        return -x


class LinearControl(nn.Module):
    """h(x, t, g) = a · x (a toy control with one parameter)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, t, g):
        return self.a * x


def test_log_rnd_terms_match_a_hand_computation_for_a_linear_toy():
    prior, control = StandardNormalPrior(), LinearControl(0.3)
    op = create("superres", factor=2, sigma=0.2)
    y = torch.tensor([[[[0.4]]]], dtype=torch.float64)
    x0 = torch.tensor([[[[0.5, -1.0], [0.2, 0.8]]]], dtype=torch.float64)
    grid = reverse_time_grid(3)
    traj = rollout(prior, control, op, y, x0, grid, GeneratorNoise(torch.Generator().manual_seed(5)))

    # by hand, with the same noise
    gen = torch.Generator().manual_seed(5)
    x, t1, t2, t3, a = x0.clone(), 0.0, 0.0, 0.0, 0.3
    for k in range(2):
        s, ds = grid[k], grid[k + 1] - grid[k]
        beta = 0.1 + (1 - s) * 19.9
        xi = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        h = a * x
        t1 += -0.5 * beta * float((h**2).sum()) * ds
        t2 += beta * float((h * h).sum()) * ds
        t3 += math.sqrt(beta) * float((h * xi).sum()) * math.sqrt(ds)
        x = x + (0.5 * beta * x + beta * (-x + h)) * ds + math.sqrt(beta * ds) * xi
    d = float((x.mean() - 0.4) ** 2) / (2 * 0.2**2)

    assert torch.allclose(traj.x_final, x)
    assert (
        traj.t1.item() == pytest.approx(t1)
        and traj.t2.item() == pytest.approx(t2)
        and traj.t3.item() == pytest.approx(t3)
    )
    assert data_term(op, traj.x_final, y).item() == pytest.approx(d)
    assert traj.log_rnd(data_term(op, traj.x_final, y)).item() == pytest.approx(d + t1 + t2 + t3)


def test_t1_plus_t2_carry_no_gradient_so_vargrad_learns_through_t3():
    """T1 + T2 = −½β‖h‖²Δs + β⟨h, sg(h)⟩Δs: its value is ½β‖h‖²Δs, its gradient in h is zero."""
    h = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    xi = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    t1, t2, t3 = step_terms(h, torch.full((3,), 7.0), 0.01, xi)
    torch.testing.assert_close(t1 + t2, 0.5 * 7.0 * h.detach().flatten(1).pow(2).sum(1) * 0.01)
    (grad_t12,) = torch.autograd.grad((t1 + t2).sum(), h, retain_graph=True)
    (grad_t3,) = torch.autograd.grad(t3.sum(), h)
    torch.testing.assert_close(grad_t12, torch.zeros_like(h), atol=1e-7, rtol=0)
    torch.testing.assert_close(grad_t3, math.sqrt(7.0) * math.sqrt(0.01) * xi)


def test_backprop_gradient_equals_autograd_of_j_written_out_for_a_linear_toy():
    prior, control = StandardNormalPrior(), LinearControl(0.3)
    op = create("superres", factor=2, sigma=0.2)
    y = torch.tensor([0.4, -0.1], dtype=torch.float64).reshape(2, 1, 1, 1)
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = reverse_time_grid(4)
    backprop_soc_gradient(
        prior, control, op, y, x0, grid, GeneratorNoise(torch.Generator().manual_seed(5)), None, False
    )

    a, gen, x, kl = (
        torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
        torch.Generator().manual_seed(5),
        x0.clone(),
        0.0,
    )
    for k in range(len(grid) - 1):  # J = mean(D + ½ Σ β ‖h‖² Δs) along the same noise, by hand
        s, ds = grid[k], grid[k + 1] - grid[k]
        beta = 0.1 + (1 - s) * 19.9
        xi = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        h = a * x
        kl = kl + 0.5 * beta * h.flatten(1).pow(2).sum(1) * ds
        x = x + (0.5 * beta * x + beta * (-x + h)) * ds + math.sqrt(beta * ds) * xi
    d = (x.mean(dim=(1, 2, 3)) - y.flatten()).pow(2) / (2 * 0.2**2)
    (expected,) = torch.autograd.grad((d + kl).mean(), a)
    assert expected.abs() > 0
    assert control.a.grad.item() == pytest.approx(expected.item(), rel=1e-4)


def test_vargrad_loss_is_the_mean_of_within_group_variances():
    log_rnd = torch.tensor([1.0, 3.0, 2.0, 10.0, 14.0, 12.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = (log_rnd[:3].var() + log_rnd[3:].var()) / 2
    assert vargrad_loss(log_rnd, groups) == pytest.approx(expected.item())
    # log Z(y) differs between measurements: shifting one group does not change the loss,
    assert vargrad_loss(log_rnd + torch.tensor([0, 0, 0, 100.0, 100, 100]), groups) == pytest.approx(expected.item())
    # whereas a variance across different y would be dominated by that shift.
    assert log_rnd.var() > 5 * expected


def test_groups_with_a_single_trajectory_contribute_nothing():
    log_rnd = torch.tensor([1.0, 3.0, 7.0])
    assert vargrad_loss(log_rnd, torch.tensor([0, 0, 1])) == pytest.approx(torch.tensor([1.0, 3.0]).var().item())


def test_filtering_drops_non_finite_and_huge_values_and_skips_when_too_few_remain():
    log_rnd = torch.tensor([1.0, float("nan"), 2.0, 1e9, 4.0, float("inf")])
    groups = torch.zeros(6, dtype=torch.long)
    result = vargrad_weights(log_rnd, groups, threshold=5e4, min_kept_fraction=0.3)
    assert result.kept.tolist() == [True, False, True, False, True, False]
    assert not result.skipped
    assert result.loss.item() == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).var().item())
    mean = 7 / 3
    assert torch.allclose(
        result.weights, torch.tensor([2 * (1 - mean) / 2, 0, 2 * (2 - mean) / 2, 0, 2 * (4 - mean) / 2, 0])
    )
    assert vargrad_weights(log_rnd, groups, threshold=1.5, min_kept_fraction=0.3).skipped


def test_gradient_steps_are_a_random_subset_plus_the_last_two():
    steps = gradient_steps(50, 0.2, torch.Generator().manual_seed(0))
    assert {48, 49} <= set(steps) and len(steps) == 12 and steps == sorted(steps)
    assert gradient_steps(50, 0.2, torch.Generator().manual_seed(1)) != steps


def tiny_htransform(channels: int = 1) -> HTransform:
    torch.manual_seed(0)
    config = HTransformConfig.from_spec(
        HNetSpec(model_channels=8, channel_mult=(1,), time_embedding_dim=16, time_hidden=16), (channels, 8, 8), 0.005
    )
    h = HTransform(config, VPSDE())
    with torch.no_grad():  # leave the zero-initialised output layers: make h non-trivial
        for p in h.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return h


@pytest.mark.parametrize("groups", [[0] * 6, [0, 0, 0, 1, 1, 1]])
def test_two_pass_gradient_equals_direct_backward_of_the_variance(gmm_problem, groups):
    """∇Var(L) by (gradient-free rollout + replay of the stored steps) = Var(L).backward() through one graph."""
    prior, op = gmm_problem["prior"], gmm_problem["operator"]
    h = tiny_htransform()
    groups = torch.tensor(groups)
    y = (
        torch.cat([gmm_problem["y"], 0.5 * gmm_problem["y"]]).repeat_interleave(3, 0)
        if groups.max()
        else gmm_problem["y"].expand(6, -1, -1, -1)
    )
    grid = reverse_time_grid(12)
    steps = gradient_steps(len(grid) - 1, 0.3, torch.Generator().manual_seed(3))
    x_init = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    # two passes
    traj = rollout(prior, h, op, y, x_init, grid, GeneratorNoise(torch.Generator().manual_seed(9)), steps)
    log_rnd = traj.log_rnd(data_term(op, traj.x_final, y))
    weights = vargrad_weights(log_rnd, groups, 5e4, 0.3).weights
    h.zero_grad()
    accumulate_vargrad_gradient(h, prior, grid, traj.stored, weights)
    two_pass = [p.grad.clone() for p in h.parameters()]

    # direct: keep the graph of h at the selected steps, detach the trajectory, backward Var(L)
    gen, x, total = torch.Generator().manual_seed(9), x_init, torch.zeros(6)
    for k in range(len(grid) - 1):
        t, ds = time_batch(grid[k], x), grid[k + 1] - grid[k]
        xi = noise_like(x, GeneratorNoise(gen))
        score, g = guidance_inputs(prior, op, x, t, y)
        hk = h(x, t, g)
        terms = sum(step_terms(hk, prior.sde.beta(t), ds, xi))
        total = total + (terms if k in steps else terms.detach())
        x = reverse_sde_step(prior.sde, x, t, ds, score + hk.detach(), xi).detach()
    h.zero_grad()
    loss = vargrad_loss(data_term(op, x, y) + total, groups)
    loss.backward()
    direct = [p.grad.clone() for p in h.parameters()]

    assert torch.allclose(log_rnd, (data_term(op, x, y) + total).detach(), rtol=1e-5)
    flat_two, flat_direct = torch.cat([g.flatten() for g in two_pass]), torch.cat([g.flatten() for g in direct])
    assert flat_direct.abs().max() > 0
    assert torch.allclose(flat_two, flat_direct, rtol=1e-4, atol=1e-6 * flat_direct.abs().max().item())


def test_backprop_gradient_is_the_gradient_of_J_with_and_without_checkpointing_and_accumulation(gmm_problem):
    prior, op = gmm_problem["prior"], gmm_problem["operator"]
    h = tiny_htransform()
    y = gmm_problem["y"].expand(4, -1, -1, -1)
    grid = reverse_time_grid(6)
    x_init = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    grads = []
    for micro, ckpt in ((None, False), (2, True)):
        h.zero_grad()
        d, kl, _ = backprop_soc_gradient(
            prior, h, op, y, x_init, grid, GeneratorNoise(torch.Generator().manual_seed(8)), micro, ckpt
        )
        grads.append(torch.cat([p.grad.flatten() for p in h.parameters()]))
    assert torch.isfinite(d).all() and (kl > 0).all()
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())
