"""Coverage of sample-based credible intervals: nominal for exact samples, low for an over-confident sampler,
unavailable where k samples cannot reach a level, and reported by `deft eval` and `deft check gmm`."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_HNET
from PIL import Image

from deftcli.calibration import (
    CURVE_LEVELS,
    LEVELS,
    gaussian_within_one_std,
    minimum_samples,
    per_image_calibration,
    quantile,
    summarise,
    unavailable_note,
)

PIXELS = 8 * 32 * 32  # n images × H × W, one channel


def gaussian_problem(k: int, spread: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth and k samples per pixel, all i.i.d. N(0, 1) (the samples' standard deviation scaled by ``spread``)."""
    gen = torch.Generator().manual_seed(seed)
    return spread * torch.randn(8, k, 1, 32, 32, generator=gen), torch.randn(8, 1, 32, 32, generator=gen)


def test_samples_from_the_truths_own_distribution_cover_at_the_nominal_rate():
    """k = 19 puts every interval end on an order statistic, so the coverage is exactly p; pixels are independent."""
    samples, truth = gaussian_problem(k=19)
    summary = summarise(per_image_calibration(samples, truth), k=19)
    for level in CURVE_LEVELS:
        standard_error = math.sqrt(level * (1 - level) / PIXELS)
        assert summary["coverage"][f"{level:g}"] == pytest.approx(level, abs=4 * standard_error)
    standard_error = math.sqrt(0.68 * 0.32 / PIXELS)
    assert summary["within_one_std"] == pytest.approx(gaussian_within_one_std(19), abs=4 * standard_error)


def test_a_sampler_with_half_the_spread_under_covers():
    samples, truth = gaussian_problem(k=19, spread=0.5)
    summary = summarise(per_image_calibration(samples, truth), k=19)
    for level in LEVELS:
        assert summary["coverage"][f"{level:g}"] < level - 0.15
    assert summary["within_one_std"] < gaussian_within_one_std(19) - 0.15
    wide = summarise(per_image_calibration(4 * samples, truth), k=19)  # twice the spread of the truth: over-covers
    assert all(wide["coverage"][f"{level:g}"] > level for level in LEVELS)


def test_the_one_std_reference_is_the_gaussian_fraction_for_k_samples():
    assert gaussian_within_one_std(100_000) == pytest.approx(math.erf(1 / math.sqrt(2)), abs=1e-4)
    assert gaussian_within_one_std(4) < gaussian_within_one_std(16) < 0.683
    assert gaussian_within_one_std(1) is None


def test_quantiles_follow_weibulls_convention():
    samples = torch.randn(3, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ordered = samples.sort(dim=1).values
    for q in (1 / 17, 0.1, 0.25, 0.5, 0.9, 16 / 17):
        expected = np.quantile(samples.numpy(), q, axis=1, method="weibull")
        np.testing.assert_allclose(quantile(ordered, q).numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="outside the order statistics"):
        quantile(ordered, 0.05)  # position 0.85 < 1


def test_a_level_that_k_samples_cannot_reach_is_unavailable_not_a_number():
    assert [minimum_samples(p) for p in LEVELS] == [3, 9, 19]  # k ≥ (1 + p)/(1 − p): (k − 1)/(k + 1) ≥ p
    samples, truth = gaussian_problem(k=18)
    summary = summarise(per_image_calibration(samples, truth), k=18)
    assert summary["coverage"]["0.9"] is None and summary["mean_width"]["0.9"] is None
    assert summary["coverage"]["0.8"] is not None
    assert summarise(per_image_calibration(samples[:, :2], truth), k=2)["coverage"]["0.5"] is None
    # at k = 19 the 90 % interval is the samples' range, [x₍₁₎, x₍₁₉₎]
    samples, truth = gaussian_problem(k=19)
    inside = (truth >= samples.min(1).values) & (truth <= samples.max(1).values)
    coverage = summarise(per_image_calibration(samples, truth), k=19)["coverage"]["0.9"]
    assert coverage == pytest.approx(float(inside.double().mean()), abs=1e-4)
    note = unavailable_note(4)
    assert "80%, 90%" in note and "-k 19" in note and unavailable_note(19) is None


def test_several_truths_per_sample_set_are_judged_against_the_same_intervals():
    samples, truth = gaussian_problem(k=19)
    one = per_image_calibration(samples[:1], truth[:1])
    several = per_image_calibration(samples[:1], torch.stack([truth[0], truth[0]])[None])
    torch.testing.assert_close(one["coverage"], several["coverage"])


@pytest.fixture
def tiny_run(tiny_prior, tmp_path):
    from deftcli.finetune import finetune
    from deftcli.specs import FinetuneSpec, build_spec

    run_dir = tmp_path / "run"
    overrides = {
        "prior.path": str(tiny_prior),
        "operator.params": {"factor": 2, "sigma": 0.1},
        "iterations": 1,
        "time_steps": 3,
        "measurements_per_batch": 1,
        "trajectories": 2,
        "run_dir": str(run_dir),
        "device": "cpu",
        **TINY_HNET,
    }
    finetune(build_spec(FinetuneSpec, overrides=overrides), quiet=True)
    return run_dir


def test_eval_reports_coverage_for_every_sampling_method_and_draws_the_calibration_plot(run_cli, tiny_run, tmp_path):
    out = tmp_path / "eval"
    code, _, err = run_cli(
        "eval",
        "--run",
        str(tiny_run),
        "--n",
        "2",
        "-k",
        "4",
        "--steps",
        "3",
        "--methods",
        "deft,dps,prior,dagger",
        "--dps-zeta",
        "1",
        "--device",
        "cpu",
        "-o",
        str(out),
    )
    assert code == 0, err
    methods = json.loads((out / "results.json").read_text())["methods"]
    for name in ("deft", "dps", "prior"):
        cal = methods[name]["calibration"]
        assert cal["k"] == 4 and 0 <= cal["coverage"]["0.5"] <= 1 and cal["mean_width"]["0.5"] > 0
        assert cal["coverage"]["0.8"] is None and cal["coverage"]["0.9"] is None  # 4 samples reach 60 % at most
        assert 0 <= cal["within_one_std"] <= 1 and len(cal["per_image"]["coverage"]["0.5"]) == 2
    assert "calibration" not in methods["dagger"]
    with Image.open(out / "calibration.png") as img:
        assert img.format == "PNG" and min(img.size) > 100
    notes = [line for line in err.splitlines() if "-k 19" in line]
    assert len(notes) == 1 and "80%" in notes[0]


@pytest.mark.parametrize("mode", ["per-measurement", "amortised"])
def test_check_gmm_reports_coverage_against_truths_of_the_exact_posterior(mode):
    from deftcli.check_gmm import GMMCheckSpec, check_gmm

    spec = GMMCheckSpec(
        shape=(1, 4, 4), components=2, iterations=2, time_steps=5, samples=60, dps_sweep=[0.3], mode=mode
    )
    result = check_gmm(spec)
    coverage = result["coverage"]
    assert coverage["samples_per_measurement"] >= minimum_samples(0.9)
    for method in ("exact_posterior", "deft", "dps", "prior", "exact_score"):
        assert all(0 <= coverage[method]["coverage"][f"{p:g}"] <= 1 for p in LEVELS)
    for level in LEVELS:  # the exact posterior's own samples: nominal up to Monte-Carlo error
        assert coverage["exact_posterior"]["coverage"][f"{level:g}"] == pytest.approx(level, abs=0.12)
