"""deft's guidance scale γ (s_θ + γ h) and its selection on training images, like DPS's ζ."""

import json
import math

import torch
from conftest import TINY_HNET

from deftcli.finetune import htransform_for
from deftcli.htransform import ConditionalScore
from deftcli.images import save_image
from deftcli.methods import DeftSampler, PriorSampler, SamplingSetup
from deftcli.metrics import data_residual
from deftcli.samplers import GeneratorNoise
from deftcli.specs import EvalSpec, FinetuneSpec, build_spec
from deftcli.tuning import with_tuned_defaults

GAUSSIAN_START, _ = with_tuned_defaults(
    build_spec(FinetuneSpec, overrides={**TINY_HNET, "hnet.start": "gaussian", "hnet.space_to_depth": 1}), None
)


def deft_sampler(problem, guidance_scale: float) -> DeftSampler:
    htransform = htransform_for(GAUSSIAN_START, problem["prior"], problem["operator"]).eval().requires_grad_(False)
    return DeftSampler(
        SamplingSetup(problem["prior"], steps=20), problem["operator"], htransform, guidance_scale=guidance_scale
    )


def seeded(seed: int) -> GeneratorNoise:
    return GeneratorNoise(torch.Generator().manual_seed(seed))


def test_the_conditional_score_is_the_prior_score_plus_gamma_times_h(gmm_problem):
    deft = deft_sampler(gmm_problem, 1.0)
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.1, 0.4, 0.7, 0.95])
    y = gmm_problem["y"].expand(4, -1, -1, -1)
    prior_score = gmm_problem["prior"].score(x, t)
    h = ConditionalScore(deft.setup.prior, deft.htransform, deft.operator, y)(x, t) - prior_score
    assert h.abs().mean() > 1e-2  # the Gaussian start guides from the first step
    for gamma in (0.0, 2.5):
        torch.testing.assert_close(
            ConditionalScore(deft.setup.prior, deft.htransform, deft.operator, y, gamma)(x, t), prior_score + gamma * h
        )


def test_gamma_zero_samples_the_prior_with_the_same_noise(gmm_problem):
    deft_at_zero = deft_sampler(gmm_problem, 0.0)
    y = gmm_problem["y"].expand(3, -1, -1, -1)
    deft = deft_at_zero.sample(y, seeded(5))
    prior = PriorSampler(deft_at_zero.setup).sample(y, seeded(5))
    assert torch.equal(deft, prior)


def test_a_larger_gamma_fits_the_measurement_more_tightly(gmm_problem):
    y = gmm_problem["y"].expand(64, -1, -1, -1)
    residuals = []
    for gamma in (0.0, 1.0, 3.0):
        x = deft_sampler(gmm_problem, gamma).sample(y, seeded(0))
        residuals.append(float(data_residual(gmm_problem["operator"], x, y).mean()))
    assert residuals[0] > residuals[1] > residuals[2]
    assert residuals[1] < 2 * gmm_problem["operator"].sigma < residuals[0]


def test_one_dps_step_is_the_prior_step_minus_zeta_times_the_gradient_of_the_residual_norm():
    """With the prior N(0, I) (score −x) Tweedie gives x̂0 = α x, so ∇_x ‖y − A x̂0‖ = −α Aᵀ(y − α A x)/‖y − α A x‖."""
    from deftcli.methods import DPSGuidance
    from deftcli.operators import create
    from deftcli.samplers import noise_like, sample_reverse_sde
    from deftcli.sde import VPSDE

    sde, op, zeta, (s0, s1) = VPSDE(), create("superres", factor=2, sigma=0.1), 0.7, (0.5, 0.6)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0.3, -0.2], dtype=torch.float64).reshape(2, 1, 1, 1)
    got = sample_reverse_sde(lambda v, t: -v, sde, x, [s0, s1], seeded(1), guidance=DPSGuidance(sde, op, y, zeta))

    t = 1 - s0
    beta, alpha = 0.1 + t * 19.9, math.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    xi = noise_like(x, seeded(1))
    prior_step = x + (0.5 * beta * x - beta * x) * (s1 - s0) + math.sqrt(beta * (s1 - s0)) * xi
    residual = y - alpha * x.mean(dim=(2, 3), keepdim=True)
    grad = (
        -alpha * residual.expand_as(x) / 4 / residual.flatten(1).norm(dim=1).reshape(2, 1, 1, 1)
    )  # Aᵀ spreads r/4 over the block
    torch.testing.assert_close(got, prior_step - zeta * grad)


def test_eval_selects_gamma_on_training_images_when_asked_warns_when_n_exceeds_the_split_and_sample_records_gamma(
    run_cli, tiny_prior, tmp_path
):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "finetune",
        "--prior",
        str(tiny_prior),
        "--operator",
        "superres",
        "--factor",
        "2",
        "--iterations",
        "1",
        "--time-steps",
        "4",
        "--measurements-per-batch",
        "1",
        "--trajectories",
        "2",
        "--hnet-channels",
        "8",
        "--hnet-mult",
        "1",
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
        "--quiet",
    )
    assert code == 0, err
    common = (
        "eval",
        "--run",
        str(run_dir),
        "--n",
        "2",
        "-k",
        "1",
        "--methods",
        "deft,dagger",
        "--steps",
        "4",
        "--device",
        "cpu",
    )
    code, _, err = run_cli(*common, "-o", str(tmp_path / "plain"))
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert plain["guidance_scale"] == plain["likelihood_weight"] == 1.0 and "deft_sweep" not in plain

    code, _, err = run_cli(*common, "--clip-x0", "-o", str(tmp_path / "clipped"))
    assert code == 0, err
    clipped = json.loads((tmp_path / "clipped" / "results.json").read_text())
    assert (plain["clip_x0"], clipped["clip_x0"]) == (False, True)
    assert (
        clipped["methods"]["deft"]["psnr_mean"] != plain["methods"]["deft"]["psnr_mean"]
    )  # the random prior's x̂0 leaves [-1, 1]

    code, _, err = run_cli(*common, "--guidance-scale", "sweep", "-o", str(tmp_path / "swept"))
    assert code == 0, err
    swept = json.loads((tmp_path / "swept" / "results.json").read_text())
    table = swept["deft_sweep"]["table"]
    assert [row["gamma"] for row in table] == EvalSpec().guidance_sweep
    best = max(table, key=lambda row: row["psnr"])["gamma"]
    assert swept["deft_sweep"]["selected"] == swept["guidance_scale"] == best
    assert len({row["psnr"] for row in table}) > 1  # γ changes the samples

    code, _, err = run_cli(
        "eval",
        "--run",
        str(run_dir),
        "--n",
        "5000",
        "-k",
        "1",
        "--methods",
        "dagger",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "all"),
    )
    assert code == 0, err
    assert "the val split has 1020 images; evaluating all 1020, not --n 5000" in err
    assert json.loads((tmp_path / "all" / "results.json").read_text())["n"] == 1020

    y = tmp_path / "y.safetensors"
    save_image(torch.zeros(3, 8, 8), y)
    code, out, err = run_cli(
        "sample",
        str(y),
        "--run",
        str(run_dir),
        "-n",
        "2",
        "--steps",
        "4",
        "--guidance-scale",
        "2",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "s"),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["method"] == "deft" and summary["guidance_scale"] == 2.0
