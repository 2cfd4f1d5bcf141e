"""The exact check: analytic Gaussian-mixture prior, exact posterior, exact h-transform, and `deft check gmm`."""

import json
import math

import pytest
import torch
from torch import nn

from deftcli.check_gmm import GMMCheckSpec, check_gmm
from deftcli.gmm import exact_posterior, hard_mixture
from deftcli.metrics import sliced_w2
from deftcli.operators import create
from deftcli.samplers import GeneratorNoise, sample_reverse_sde
from deftcli.sde import reverse_time_grid
from deftcli.soc import data_term, rollout


@pytest.fixture(scope="module")
def problem():
    op = create("superres", factor=2, sigma=0.1)
    prior = hard_mixture(op, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    y = op.measure(prior.sample(1, gen), generator=gen)
    return op, prior, y, exact_posterior(prior, op, y[0])


def test_the_hard_mixture_pairs_differ_only_in_the_null_space(problem):
    op, prior, _, _ = problem
    means = prior.means.float()
    assert torch.allclose(op.A(means[0:1]), op.A(means[1:2]), atol=1e-5)
    assert (means[0] - means[1]).norm() > 1.0
    assert len(set(prior.weights.tolist())) == 4


def test_score_matches_autograd_of_the_marginal_log_density(problem):
    _, prior, _, _ = problem
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.001, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(prior.log_density(x, t).sum(), x)
    assert torch.allclose(prior.score(x.detach(), t), grad, rtol=1e-8, atol=1e-8)


def test_exact_posterior_matches_importance_sampling(problem):
    op, prior, y, posterior = problem
    x = prior.sample(400_000, torch.Generator().manual_seed(2)).double()
    log_w = -data_term(op, x, y.double())
    w = torch.softmax(log_w, dim=0)
    mean_is = (w[:, None] * x.flatten(1)).sum(0)
    assert torch.allclose(mean_is, posterior.mean.flatten(), atol=0.02)
    resp = prior.responsibilities(x, torch.zeros(x.shape[0], dtype=torch.float64))
    assert torch.allclose((w[:, None] * resp).sum(0), posterior.weights, atol=0.02)


def test_exact_posterior_weights_match_importance_sampling_when_the_evidence_decides(problem):
    """y between the two pairs' bases: the evidence N(y; A μ_k, s² A Aᵀ + σ_y² I), not the prior weights alone, sets w'.
    σ_y = 0.5 keeps the likelihood broad enough for importance sampling from the prior to be accurate."""
    _, prior, _, _ = problem
    op = create("superres", factor=2, sigma=0.5)
    means = prior.means.reshape(-1, *prior.image_shape)
    b0, b1 = means[0:2].mean(0, keepdim=True), means[2:4].mean(0, keepdim=True)
    gap = op.A(b1) - op.A(b0)
    variance = prior.std**2 / 4 + op.sigma**2  # A Aᵀ = I/4 for 2× super-resolution
    y = op.A((b0 + b1) / 2) + 0.75 * variance / gap.pow(2).sum() * gap  # half the Mahalanobis gap is 0.75
    posterior = exact_posterior(prior, op, y[0])
    pairs = posterior.weights.reshape(2, 2).sum(1)
    assert 0.2 < pairs[0] < 0.8  # neither pair wins outright

    x = prior.sample(400_000, torch.Generator().manual_seed(3)).double()
    w = torch.softmax(-data_term(op, x, y.double()), dim=0)
    resp = prior.responsibilities(x, torch.zeros(x.shape[0], dtype=torch.float64))
    assert torch.allclose((w[:, None] * resp).sum(0), posterior.weights, atol=0.02)


class ExactHTransform(nn.Module):
    """h* = ∇ log p_t^post − ∇ log p_t: the optimal control, known in closed form for a mixture."""

    def __init__(self, prior, posterior):
        super().__init__()
        self.prior, self.posterior = prior, posterior

    def forward(self, x, t, g):
        return self.posterior.score(x, t, self.prior.sde) - self.prior.score(x, t)


def test_sampler_with_the_exact_h_transform_reproduces_the_posterior(problem):
    _, prior, _, posterior = problem
    gen = torch.Generator().manual_seed(3)
    samples = sample_reverse_sde(
        lambda x, t: posterior.score(x, t, prior.sde),
        prior.sde,
        torch.randn(2000, 1, 8, 8, generator=gen),
        reverse_time_grid(100),
        GeneratorNoise(gen),
    )
    assert float((samples.double().mean(0) - posterior.mean).norm() / posterior.mean.norm()) < 0.03
    weights = posterior.responsibilities(samples).mean(0)
    assert float(0.5 * (weights - posterior.weights).abs().sum()) < 0.04
    floor = sliced_w2(posterior.sample(2000, gen), posterior.sample(2000, gen), gen)
    assert sliced_w2(samples, posterior.sample(2000, gen), gen) < 2.5 * floor


def test_log_rnd_under_the_exact_control_is_constant_and_equals_minus_log_evidence(problem):
    """At the optimum L = log dQ^u/dQ* − log p(y) − (m/2) log 2πσ²: constant across trajectories."""
    op, prior, y, posterior = problem
    n, gen = 128, torch.Generator().manual_seed(4)
    ys = y.expand(n, -1, -1, -1)
    exact = rollout(
        prior,
        ExactHTransform(prior, posterior),
        op,
        ys,
        torch.randn(n, 1, 8, 8, generator=gen),
        reverse_time_grid(100),
        GeneratorNoise(gen),
    )
    log_rnd = exact.log_rnd(data_term(op, exact.x_final, ys))
    uncontrolled = rollout(
        prior,
        ExactHTransform(prior, prior_as_posterior(prior)),
        op,
        ys,
        torch.randn(n, 1, 8, 8, generator=gen),
        reverse_time_grid(100),
        GeneratorNoise(gen),
    )
    log_rnd_prior = uncontrolled.log_rnd(data_term(op, uncontrolled.x_final, ys))

    a = op.matrix((1, 8, 8))
    m = a.shape[0]
    cov = prior.std**2 * a @ a.T + op.sigma**2 * torch.eye(m, dtype=torch.float64)
    comps = torch.stack(
        [
            torch.distributions.MultivariateNormal(a @ mu, cov).log_prob(y.double().flatten())
            for mu in prior.means.flatten(1)
        ]
    )
    log_evidence = torch.logsumexp(comps + prior.log_weights, 0)
    expected = float(-log_evidence - m / 2 * math.log(2 * math.pi * op.sigma**2))
    assert float(log_rnd.std()) < 0.02 * float(log_rnd_prior.std())
    assert float(log_rnd.mean()) == pytest.approx(expected, abs=0.3)


def prior_as_posterior(prior):
    """The prior written as a 'posterior' mixture, so that h = 0 (the uncontrolled process)."""
    from deftcli.gmm import GaussianMixturePosterior

    d = prior.means[0].numel()
    return GaussianMixturePosterior(
        prior.weights, prior.means.flatten(1), prior.std**2 * torch.eye(d, dtype=torch.float64), prior.image_shape
    )


def test_a_short_fine_tuning_run_lowers_the_posterior_mean_error():
    base = {"iterations": 0, "time_steps": 30, "trajectories": 32, "samples": 400, "dps_sweep": [0.3], "lr": 2e-3}
    before = check_gmm(GMMCheckSpec(**{**base, "iterations": 1}))
    after = check_gmm(GMMCheckSpec(**{**base, "iterations": 60}))
    assert after["deft"]["mean_rel_error"] < 0.5 * before["deft"]["mean_rel_error"]
    assert after["deft"]["weight_tv"] < before["prior"]["weight_tv"]
    exact = after["exact_score"]  # the sampler driven by the exact posterior score: only discretisation error
    assert (
        exact["mean_rel_error"] < after["deft"]["mean_rel_error"]
        and exact["weight_tv"] < 0.5 * before["prior"]["weight_tv"]
    )


def test_fine_tuning_with_a_likelihood_weight_samples_the_tempered_posterior():
    result = check_gmm(
        GMMCheckSpec(
            iterations=60, time_steps=30, trajectories=32, samples=400, dps_sweep=[0.3], lr=2e-3, likelihood_weight=4.0
        )
    )
    shift = result["problem"]["posterior_mean_rel_distance_to_target"]  # p(x | y) against p(x) p(y | x)^4
    assert shift > 0.08
    # scored against the tempered posterior; a run that ignored w (fine-tuned for p(x | y)) errs by ≈ the shift
    # (0.094 here)
    assert result["deft"]["mean_rel_error"] < 0.7 * shift and result["exact_score"]["mean_rel_error"] < 0.5 * shift


def test_check_gmm_cli_prints_one_json_object_with_a_section_per_method(run_cli):
    code, out, err = run_cli(
        "check",
        "gmm",
        "--shape",
        "1,4,4",
        "--components",
        "2",
        "--operator",
        "inpaint",
        "--mask",
        "box",
        "--sigma",
        "0.1",
        "--iterations",
        "2",
        "--time-steps",
        "5",
        "--samples",
        "50",
        "--seed",
        "3",
    )
    assert code == 0, err
    result = json.loads(out)
    for section in ("problem", "exact", "deft", "dps", "prior", "exact_score"):
        assert section in result
    for key in ("mean_rel_error", "weight_tv", "sliced_w2"):
        assert math.isfinite(result["deft"][key]) and math.isfinite(result["dps"][key])
    assert result["problem"]["operator"].startswith("inpaint")
