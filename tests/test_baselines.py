"""The zero-shot baselines DDRM and DiffPIR: their proximal and spectral steps, determinism, their posterior
means on an exact Gaussian prior, an independent implementation (deepinv), and the command line.

Posterior means: a 1×8×8 Gaussian prior N(μ, 0.3² I) (the one-component mixture of deftcli.gmm), σ_y = 0.1,
N = 50, 2000 samples. The root-mean-square distance between the samples' mean and the exact posterior mean
must stay below 0.02; the Monte-Carlo floor is about 0.006 there, and the prior mean and A†y are 0.08–0.26 away.
DDRM is not exact: its mean drifts from the posterior as τ = σ_y / s grows (on this prior, 2× super-resolution:
0.005 at σ_y = 0.1, 0.11 at σ_y = 1), so the check keeps τ small.

deepinv's DiffPIR cannot be run on our time grid: it fixes a discrete 1000-step DDPM schedule (β from 1e-4 to
2e-2) and its own square-root index sequence, starts from √ᾱ_T (2 Aᵀy − 1 + noise) instead of N(0, I), draws
its noise from torch's global generator and returns the last state without a final proximal step. What does
agree: our prior wrapped as deepinv's denoiser, its levels mapped onto our VP-SDE (σ̄ = σ/α, the same α), λ
halved (deepinv's σ_n is on [0, 1] images and its proximal step weighs ρ twice: ρ = λ_deepinv σ_y² / (2 σ̄²)),
our step reproduces every one of its iterations, and our sampler run on its levels from its first state with
its noise reproduces its output, both to 1e-5.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_user_error, snapshot

from deftcli.ddrm import sample_ddrm
from deftcli.diffpir import diffpir_step, proximal_step, sample_diffpir
from deftcli.gmm import GaussianMixturePrior, exact_posterior
from deftcli.methods import SamplingSetup, build_sampler
from deftcli.operators import Operator, OperatorParams, create
from deftcli.samplers import GeneratorNoise, PerSampleNoise, clip_denoised
from deftcli.sde import VPSDE
from deftcli.specs import DEFAULT_DIFFPIR_LAMBDA, DEFAULT_DIFFPIR_ZETA
from operators.superres import SuperResolution

OPERATORS = {
    "superres": {"factor": 2, "sigma": 0.1},
    "inpaint": {"mask": "random", "missing_fraction": 0.5, "sigma": 0.1},
    "blur": {"kernel_size": 5, "kernel_std": 1.0, "sigma": 0.1},
}
SPECTRAL = ("ddrm", "diffpir")


def gaussian_prior(channels: int = 1) -> GaussianMixturePrior:
    """N(μ, 0.3² I) on C×8×8 images with a smooth mean in [-0.6, 0.6]."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand((1, channels, 2, 2), generator=generator, dtype=torch.float64) * 1.2 - 0.6
    mean = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear")
    return GaussianMixturePrior(mean, torch.ones(1), 0.3)


def problem(name: str, channels: int = 1, batch: int = 1) -> tuple[GaussianMixturePrior, Operator, torch.Tensor]:
    prior, operator = gaussian_prior(channels), create(name, **OPERATORS[name])
    generator = torch.Generator().manual_seed(1)
    y = operator.measure(prior.sample(1, generator), generator=generator)
    return prior, operator, y.expand(batch, *y.shape[1:])


@pytest.mark.parametrize("name", OPERATORS)
def test_the_proximal_step_solves_the_regularised_least_squares_problem(name):
    """x̂0^(y) = (AᵀA + ρ I)⁻¹ (Aᵀy + ρ x̂0), from the dense matrix of A."""
    operator = create(name, **OPERATORS[name])
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    y = operator.A(torch.randn(x0.shape, generator=generator, dtype=torch.float64))
    a = operator.matrix((3, 8, 8))
    for rho in (0.05, 3.0):
        gram = a.T @ a + rho * torch.eye(a.shape[1], dtype=torch.float64)
        expected = torch.linalg.solve(gram, (y.flatten(1) @ a + rho * x0.flatten(1)).T).T
        torch.testing.assert_close(proximal_step(operator.svd(), y, x0, rho).flatten(1), expected)


@pytest.mark.parametrize("method", SPECTRAL)
@pytest.mark.parametrize("name", OPERATORS)
def test_samples_have_the_image_shape_and_follow_their_generators_whatever_the_batching(method, name):
    prior, operator, y = problem(name, channels=3, batch=4)
    sampler = build_sampler(method, SamplingSetup(prior, steps=20), operator)
    generators = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    together = sampler.sample(y, PerSampleNoise(generators()))
    assert together.shape == (4, 3, 8, 8) and together.dtype == torch.float32 and torch.isfinite(together).all()
    assert torch.equal(together, sampler.sample(y, PerSampleNoise(generators())))
    streams = generators()
    halves = torch.cat(
        [sampler.sample(y[:2], PerSampleNoise(streams[:2])), sampler.sample(y[2:], PerSampleNoise(streams[2:]))]
    )
    torch.testing.assert_close(halves, together, rtol=0, atol=1e-6)
    assert not torch.allclose(together[0], together[1])  # different streams, different samples
    assert sampler.cost().as_dict() == {"nfe_prior": 20, "nfe_hnet": 0, "backward_prior": 0}


@pytest.mark.parametrize("method", SPECTRAL)
@pytest.mark.parametrize("name", ["superres", "inpaint"])
def test_the_sample_mean_is_the_exact_gaussian_posterior_mean(method, name):
    prior, operator, y = problem(name, batch=2000)
    posterior_mean = exact_posterior(prior, operator, y[:1]).mean
    sampler = build_sampler(
        method, SamplingSetup(prior, steps=50), operator, settings={"diffpir_lambda": 1.0, "diffpir_zeta": 1.0}
    )
    samples = sampler.sample(y, GeneratorNoise(torch.Generator().manual_seed(2)))
    error = float((samples.double().mean(0) - posterior_mean).pow(2).mean().sqrt())
    assert error < 0.02
    assert float((prior.means[0] - posterior_mean).pow(2).mean().sqrt()) > 0.1  # the check can fail: the prior is off


def test_ddrm_with_eta_b_one_keeps_a_noiseless_measurement_exactly():
    """σ_y = 0 gives τ = 0: every observed coordinate is pinned to ȳ at every level, so A x = y."""
    prior, operator = gaussian_prior(), create("superres", factor=2, sigma=0.0)
    y = operator.A(prior.sample(1, torch.Generator().manual_seed(1))).expand(3, -1, -1, -1)
    grid = SamplingSetup(prior, steps=20).grid
    x = sample_ddrm(
        prior.score,
        prior.sde,
        operator.svd(),
        y,
        0.0,
        torch.randn(3, 1, 8, 8),
        grid,
        0.85,
        1.0,
        GeneratorNoise(torch.Generator().manual_seed(0)),
        True,
    )
    torch.testing.assert_close(operator.A(x), y, rtol=0, atol=1e-5)


def test_diffpir_with_zeta_zero_draws_no_fresh_noise():
    """ζ = 0 draws no fresh noise into the state: two generators give the same sample from the same start."""
    prior, operator, y = problem("superres", batch=2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = SamplingSetup(prior, steps=20).grid
    runs = [
        sample_diffpir(
            prior.score,
            prior.sde,
            operator.svd(),
            y,
            operator.sigma,
            x,
            grid,
            4.0,
            0.0,
            GeneratorNoise(torch.Generator().manual_seed(seed)),
            True,
        )
        for seed in (1, 2)
    ]
    torch.testing.assert_close(runs[0], runs[1])


# ------------------------------------------------------------------ deepinv's DiffPIR


def time_of_noise_level(sde: VPSDE, sigma_bar: float) -> float:
    """The t with σ(t)/α(t) = σ̄: log α = −½ log(1 + σ̄²) = −¼ t² (β1 − β0) − ½ t β0."""
    log_alpha = -0.5 * math.log1p(sigma_bar**2)
    a, b = 0.25 * (sde.beta_max - sde.beta_min), 0.5 * sde.beta_min
    return (-b + math.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)


class PriorAsDeepinvDenoiser(torch.nn.Module):
    """deepinv's denoiser D(x, σ_d) on [0, 1] images: Tweedie's x̂0 of our clipped prior at σ̄ = 2 σ_d (calls kept)."""

    def __init__(self, prior: GaussianMixturePrior) -> None:
        super().__init__()
        self.sde, self.score = prior.sde, clip_denoised(prior.score, prior.sde)
        self.calls: list[tuple[torch.Tensor, float]] = []  # (x_t in the VP scale, σ̄)

    def forward(self, x_unit: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma_bar = 2 * float(sigma)
        alpha = 1 / math.sqrt(1 + sigma_bar**2)
        x = alpha * (2 * x_unit - 1)
        t = torch.full((x.shape[0],), time_of_noise_level(self.sde, sigma_bar))
        self.calls.append((x, sigma_bar))
        return (self.sde.tweedie_x0(x, self.score(x, t), t) + 1) / 2


@pytest.mark.parametrize("name", ["superres", "inpaint"])
def test_diffpir_reproduces_deepinv_iteration_by_iteration(name, monkeypatch):
    dinv = pytest.importorskip("deepinv")
    prior, operator = gaussian_prior(), create(name, **OPERATORS[name])
    generator = torch.Generator().manual_seed(1)
    y = operator.measure(prior.sample(2, generator), generator=generator)
    noise_model = dinv.physics.GaussianNoise(sigma=operator.sigma / 2)  # deepinv works on [0, 1] images
    if name == "inpaint":
        mask = operator.observed_mask(8, 8).float()[None]
        physics = dinv.physics.Inpainting(img_size=(1, 8, 8), mask=mask, noise_model=noise_model)
    else:
        physics = dinv.physics.LinearPhysics(
            A=operator.A, A_adjoint=operator.A_adjoint, noise_model=noise_model, solver="CG", max_iter=200, tol=1e-10
        )
    denoiser, lam, zeta = PriorAsDeepinvDenoiser(prior), 8.0, 0.4
    diffpir = dinv.sampling.DiffPIR(
        model=denoiser, data_fidelity=dinv.optim.data_fidelity.L2(), max_iter=20, zeta=zeta, lambda_=lam
    )
    noises, randn_like = [], torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda like: noises.append(randn_like(like)) or noises[-1])
    output = 2 * diffpir((y + operator.A(torch.ones(2, 1, 8, 8))) / 2, physics) - 1
    monkeypatch.undo()

    states = [x for x, _ in denoiser.calls]
    levels = [(1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)) for _, s in denoiser.calls]
    svd = operator.svd()
    for i in range(len(states) - 1):  # noises[0] made deepinv's start; step i draws noises[i + 1]
        unit = states[i] / (2 * levels[i][0]) + 0.5
        x0 = PriorAsDeepinvDenoiser(prior)(unit, torch.tensor(denoiser.calls[i][1] / 2)) * 2 - 1
        step = diffpir_step(
            svd, y, operator.sigma, states[i], x0, levels[i], levels[i + 1], lam / 2, zeta, noises[i + 1]
        )
        torch.testing.assert_close(step, states[i + 1], rtol=0, atol=1e-5)

    grid = [1 - time_of_noise_level(prior.sde, s) for _, s in denoiser.calls]
    replay = iter(noises[1:])
    ours = sample_diffpir(
        denoiser.score,
        prior.sde,
        svd,
        y,
        operator.sigma,
        states[0],
        grid,
        lam / 2,
        zeta,
        lambda shape, device, dtype: next(replay),
        denoise_final=False,
    )
    torch.testing.assert_close(ours, output, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the command line


def without_svd(monkeypatch) -> None:
    """Super-resolution as a plugin that gives no SVD."""
    monkeypatch.setattr(SuperResolution, "svd", Operator.svd)


def test_an_operator_gives_no_svd_unless_it_defines_one():
    class Identity(Operator):
        name = "identity"

        def A(self, x):
            return x

        A_adjoint = A_dagger = A

        def measurement_shape(self, image_shape):
            return image_shape

    assert Identity(OperatorParams()).svd() is None
    assert all(create(name).svd() is not None for name in OPERATORS)


@pytest.mark.parametrize("method", SPECTRAL)
def test_sample_with_ddrm_or_diffpir_records_its_settings_and_cost(method, run_cli, assets, tmp_path):
    code, _, err = run_cli(
        "sample",
        str(assets.y),
        "--run",
        str(assets.run),
        "--method",
        method,
        "-n",
        "2",
        "--steps",
        "4",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "s"),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    settings = {
        "ddrm": {"ddrm_eta": 0.85, "ddrm_eta_b": 1.0},
        "diffpir": {"diffpir_lambda": DEFAULT_DIFFPIR_LAMBDA, "diffpir_zeta": DEFAULT_DIFFPIR_ZETA},
    }[method]
    assert summary["method"] == method and settings.items() <= summary.items()
    assert (summary["nfe_prior"], summary["nfe_hnet"], summary["backward_prior"]) == (4, 0, 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "{y}", "--run", "{run}", "--method", "ddrm"],
        ["sample", "{y}", "--run", "{run}", "--method", "diffpir", "--diffpir-zeta", "0.5"],
        ["eval", "--run", "{run}", "--methods", "dagger,diffpir"],
        ["eval", "--run", "{run}", "--spec", "{spec}"],
    ],
    ids=["sample-ddrm", "sample-diffpir", "eval-diffpir", "eval-ddrm-option"],
)
def test_spectral_methods_refuse_an_operator_without_svd_before_writing_anything(
    argv, run_cli, assets, tmp_path, monkeypatch
):
    without_svd(monkeypatch)
    spec = tmp_path / "e.json"
    spec.write_text(json.dumps({"ddrm_eta": 0.5}))  # an option of ddrm asks for ddrm
    before = snapshot(tmp_path, assets.root)
    args = [a.format(y=assets.y, run=assets.run, spec=spec) for a in argv]
    code, _, err = run_cli(*args, "--steps", "3", "--device", "cpu", "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "singular value decomposition", "operator 'superres'")
    assert snapshot(tmp_path, assets.root) == before


def test_eval_leaves_ddrm_and_diffpir_out_by_default_when_the_operator_has_no_svd(
    run_cli, assets, tmp_path, monkeypatch
):
    without_svd(monkeypatch)
    code, _, err = run_cli(
        "eval",
        "--run",
        str(assets.run),
        "--n",
        "1",
        "-k",
        "1",
        "--steps",
        "3",
        "--dps-zeta",
        "1",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "e"),
    )
    assert code == 0, err
    assert "operator 'superres' has no singular value decomposition, so ddrm and diffpir are not evaluated" in err
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert list(results["methods"]) == ["deft", "dps", "prior", "dagger"]


def test_eval_selects_diffpir_lambda_and_zeta_on_training_images(run_cli, assets, tmp_path):
    common = ("eval", "--run", str(assets.run), "--n", "1", "-k", "1", "--steps", "3", "--device", "cpu")
    code, _, err = run_cli(*common, "--methods", "diffpir,ddrm", "-o", str(tmp_path / "swept"))
    assert code == 0, err
    results = json.loads((tmp_path / "swept" / "results.json").read_text())
    table = results["diffpir_sweep"]["table"]
    grid = [(lam, zeta) for lam in (0.25, 1.0, 4.0) for zeta in (0.3, 0.7, 1.0)]
    assert [(row["lambda"], row["zeta"]) for row in table] == grid
    best = max(table, key=lambda row: row["psnr"])
    assert results["diffpir_sweep"]["selected"] == {"lambda": best["lambda"], "zeta": best["zeta"]}
    assert (results["diffpir_lambda"], results["diffpir_zeta"]) == (best["lambda"], best["zeta"])
    assert (results["ddrm_eta"], results["ddrm_eta_b"]) == (0.85, 1.0)
    assert set(results["methods"]) == {"diffpir", "ddrm"} and results["methods"]["ddrm"]["nfe_prior_per_image"] == 3

    code, _, err = run_cli(*common, "--methods", "diffpir", "--diffpir-lambda", "4", "-o", str(tmp_path / "zeta-only"))
    assert code == 0, err
    results = json.loads((tmp_path / "zeta-only" / "results.json").read_text())
    table = results["diffpir_sweep"]["table"]
    assert [(row["lambda"], row["zeta"]) for row in table] == [(4.0, 0.3), (4.0, 0.7), (4.0, 1.0)]
