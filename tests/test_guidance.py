"""The h-transform's start −c_0(t) g: the exact h-transform of a Gaussian prior when A Aᵀ is scalar."""

import pytest
import torch

from deftcli.finetune import htransform_for
from deftcli.gmm import GaussianMixturePrior
from deftcli.htransform import load_htransform, save_htransform
from deftcli.operators import Operator, create
from deftcli.specs import FinetuneSpec
from deftcli.tuning import with_tuned_defaults

IMAGE_SHAPE = (2, 4, 4)
VARIANCE = 0.3
HNET = {
    "start": "gaussian",
    "model_channels": 8,
    "channel_mult": [1],
    "space_to_depth": 1,
    "time_embedding_dim": 16,
    "time_hidden": 16,
}
SPEC, _ = with_tuned_defaults(FinetuneSpec(hnet=HNET), None)


def gaussian_prior() -> GaussianMixturePrior:
    """N(μ, v I) with a per-channel constant mean: one mixture component."""
    means = torch.tensor([-0.3, 0.2])[:, None, None].expand(IMAGE_SHAPE)[None].clone()
    return GaussianMixturePrior(means, torch.ones(1), VARIANCE**0.5)


def exact_log_likelihood(
    operator: Operator,
    prior: GaussianMixturePrior,
    x_t: torch.Tensor,
    t: float,
    y: torch.Tensor,
    likelihood_weight: float = 1.0,
) -> torch.Tensor:
    """log p(y | x_t) of the joint Gaussian of (x0, x_t, y), by dense conditioning (no scalar shortcut).

    With a likelihood weight w: log E[p(y | x0)^w | x_t] up to a constant, since p(y | x0)^w ∝ N(y; A x0, σ_y²/w I).
    """
    matrix = operator.matrix(IMAGE_SHAPE)
    alpha, sigma = (float(v) for v in (prior.sde.alpha(torch.tensor(t)), prior.sde.sigma(torch.tensor(t))))
    mu = prior.means[0].flatten()
    gain = alpha * VARIANCE / (alpha**2 * VARIANCE + sigma**2)
    mean = matrix @ (mu + gain * (x_t.flatten() - alpha * mu))
    covariance = VARIANCE * (1 - alpha * gain) * matrix @ matrix.T + operator.sigma**2 / likelihood_weight * torch.eye(
        matrix.shape[0], dtype=torch.float64
    )
    return torch.distributions.MultivariateNormal(mean, covariance).log_prob(y.flatten())


@pytest.mark.parametrize(
    "operator",
    [create("superres", factor=2, sigma=0.1), create("inpaint", mask="random", sigma=0.05)],
    ids=["superres", "inpaint"],
)
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_start_is_the_exact_score_of_the_likelihood_for_a_gaussian_prior(operator: Operator, t: float) -> None:
    prior = gaussian_prior()
    guidance = htransform_for(SPEC, prior, operator).config.guidance
    assert guidance is not None and guidance.data_variance == pytest.approx(VARIANCE)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn((1, *IMAGE_SHAPE), generator=generator, dtype=torch.float64).requires_grad_(True)
    y = operator.measure(prior.sample(1, generator).double(), generator)
    (expected,) = torch.autograd.grad(exact_log_likelihood(operator, prior, x_t, t, y), x_t)
    time = torch.tensor([t])
    x0_hat = prior.sde.tweedie_x0(x_t.detach(), prior.score(x_t.detach(), time), time)
    start = -guidance.scale(time.double(), prior.sde) * operator.likelihood_grad(x0_hat, y)
    torch.testing.assert_close(start, expected)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_with_a_likelihood_weight_the_start_is_the_exact_score_of_the_tempered_likelihood(t: float) -> None:
    prior, operator, weight = gaussian_prior(), create("superres", factor=2, sigma=0.1), 3.0
    htransform = htransform_for(SPEC.model_copy(update={"likelihood_weight": weight}), prior, operator)
    with torch.no_grad():
        for parameter in htransform.parameters():
            parameter.zero_()  # NN_φ = 0 and c_ψ = 0: h is its start alone
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn((1, *IMAGE_SHAPE), generator=generator, dtype=torch.float64).requires_grad_(True)
    y = operator.measure(prior.sample(1, generator).double(), generator)
    (expected,) = torch.autograd.grad(exact_log_likelihood(operator, prior, x_t, t, y, weight), x_t)
    time = torch.tensor([t])
    x0_hat = prior.sde.tweedie_x0(x_t.detach(), prior.score(x_t.detach(), time), time)
    h = htransform(
        x_t.detach().float(), time, operator.likelihood_grad(x0_hat, y).float()
    )  # the sampler's unweighted g
    torch.testing.assert_close(h, expected.float(), rtol=1e-4, atol=1e-5)
    (untempered,) = torch.autograd.grad(exact_log_likelihood(operator, prior, x_t, t, y), x_t)
    assert not torch.allclose(h, untempered.float(), rtol=0.05)


def test_a_likelihood_weight_feeds_the_network_the_weighted_gradient_and_is_kept_in_the_checkpoint(tmp_path) -> None:
    prior, operator = gaussian_prior(), create("superres", factor=2, sigma=0.1)
    torch.manual_seed(0)
    weighted = htransform_for(SPEC.model_copy(update={"likelihood_weight": 2.5}), prior, operator)
    plain = htransform_for(SPEC, prior, operator)
    plain.load_state_dict(weighted.state_dict())
    x, g, t = torch.randn(3, *IMAGE_SHAPE), torch.randn(3, *IMAGE_SHAPE), torch.tensor([0.05, 0.5, 0.95])
    assert plain.config.guidance is not None and weighted.config.guidance is not None
    plain.config.guidance = weighted.config.guidance  # the start is built for σ_y/√w (the test above)
    torch.testing.assert_close(weighted(x, t, g), plain(x, t, 2.5 * g))
    save_htransform(weighted, tmp_path / "h.safetensors", {})
    assert load_htransform(tmp_path / "h.safetensors", prior)[0].config.likelihood_weight == 2.5


def test_untrained_h_network_is_the_start_plus_the_small_learned_scale() -> None:
    prior, operator = gaussian_prior(), create("superres", factor=2, sigma=0.1)
    htransform = htransform_for(SPEC, prior, operator)
    x, g, t = torch.randn(3, *IMAGE_SHAPE), torch.randn(3, *IMAGE_SHAPE), torch.tensor([0.05, 0.5, 0.95])
    scale = htransform.config.guidance.scale(t, prior.sde) + htransform.time_model(t)
    torch.testing.assert_close(htransform(x, t, g), -scale * g)
    assert scale[0].item() > 0.5 > 0.01 > scale[-1].item()  # c_0 → 1 as t → 0 and ≈ 0 at t = 1


def test_h_is_its_network_term_minus_the_scaled_weighted_gradient() -> None:
    prior, operator = gaussian_prior(), create("superres", factor=2, sigma=0.1)
    torch.manual_seed(0)
    htransform = htransform_for(SPEC.model_copy(update={"likelihood_weight": 2.0}), prior, operator)
    with torch.no_grad():
        for p in htransform.cond_model.parameters():  # a network that is far from its near-zero start
            p.add_(0.1 * torch.randn_like(p))
    x, g, t = torch.randn(3, *IMAGE_SHAPE), torch.randn(3, *IMAGE_SHAPE), torch.tensor([0.05, 0.5, 0.95])
    wg = htransform.weighted(g)
    torch.testing.assert_close(wg, 2.0 * g)
    network = htransform.network(x, t, wg)
    assert network.abs().mean() > 0.1 * (htransform.scale(t) * wg).abs().mean()
    torch.testing.assert_close(htransform(x, t, g), network - htransform.scale(t) * wg)
    torch.testing.assert_close(
        htransform.scale(t), htransform.config.guidance.scale(t, prior.sde) + htransform.time_model(t)
    )


def test_zero_start_the_default_and_noiseless_measurements_have_no_start() -> None:
    prior = gaussian_prior()
    zero = SPEC.model_copy(update={"hnet": SPEC.hnet.model_copy(update={"start": "zero"})})
    assert htransform_for(zero, prior, create("superres", factor=2, sigma=0.1)).config.guidance is None
    assert with_tuned_defaults(FinetuneSpec(), None)[0].hnet.start == "zero"  # unset, on a prior without tuned defaults
    assert htransform_for(SPEC, prior, create("superres", factor=2, sigma=0.0)).config.guidance is None


def test_start_is_kept_in_the_checkpoint(tmp_path) -> None:
    prior = gaussian_prior()
    htransform = htransform_for(SPEC, prior, create("superres", factor=2, sigma=0.1))
    save_htransform(htransform, tmp_path / "h.safetensors", {})
    loaded, _ = load_htransform(tmp_path / "h.safetensors", prior)
    assert loaded.config == htransform.config
