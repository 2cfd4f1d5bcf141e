"""``deft check gmm``: fine-tuning against an analytic posterior (DESIGN.md §1, "Exact check").

A hard Gaussian-mixture prior (pairs b ± n with n in the null space of A, unequal weights) gives a
multi-modal posterior known in closed form (with a likelihood weight w, the tempered posterior
p(x) p(y | x)^w, i.e. σ_y → σ_y/√w, is the target). The check draws x from the prior, measures y, fine-tunes
an h-network with ``vargrad`` through the same code path as ``deft finetune`` (per-measurement, or
amortised over measurements of prior samples), samples it, and compares with exact posterior samples
— and does the same for DPS at the ζ a small sweep on *other* measurements selects. Samples are the
states at t = ε (no final denoising). Metrics:

- ``mean_rel_error`` ‖m̂ − m‖ / ‖m‖ of the sample mean against the exact posterior mean;
- ``weight_tv`` ½ Σ_k |ŵ_k − w'_k|, ŵ the mean exact responsibilities of the samples;
- ``sliced_w2`` a sliced Wasserstein-2 distance to exact posterior samples of the same size, next to
  ``noise_floor`` the same distance between two independent exact sample sets.

Besides ``deft``, ``dps`` and ``prior``, the JSON has ``exact_score``: the same reverse SDE on the
same grid driven by the exact posterior score, i.e. deft with h = h*, whose errors are the sampler's
own (time discretisation) — what no amount of fine-tuning can remove at this N.

Its ``coverage`` section (:mod:`deftcli.calibration`) has a ground truth: the coverage of each
sampler's central credible intervals by truths x* exchangeable with exact posterior samples, so that
exact samples cover at the nominal rate (``exact_posterior``, the exact sampler's own samples, is the
Monte-Carlo reference). Per-measurement mode: T = ``samples`` truths drawn from the exact posterior of
the one y, all judged against the same ``samples`` samples. Amortised mode: P = 50 pairs x* ~ p(x),
y = A x* + η drawn from the likelihood of the target (noise σ_y/√w, so that p(x) p(y | x)^w is their
exact posterior), and max(19, ``samples``/P) samples per y.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from . import calibration
from .devices import Runtime, resolve_device
from .errors import DeftError
from .finetune import finetune
from .gmm import GaussianMixturePosterior, GaussianMixturePrior, exact_posterior, hard_mixture
from .htransform import load_htransform
from .images import save_image
from .methods import DPSSampler, Sampler, SamplingSetup, build_sampler
from .metrics import sliced_w2
from .operators import Operator, create
from .runs import resolve_run_dir
from .samplers import GeneratorNoise, sample_reverse_sde
from .sde import reverse_time_grid
from .specs import PRECISION_HELP, FinetuneSpec, HNetSpec, OperatorSpec, Precision, Seed, StrictModel

SWEEP_MEASUREMENTS = 2
COVERAGE_MEASUREMENTS = 50
SWEEP_SAMPLES = 500


class GMMCheckSpec(StrictModel):
    """Options of ``deft check gmm``."""

    shape: tuple[int, int, int] = (1, 8, 8)
    components: int = Field(4, ge=2)
    component_std: float = Field(0.1, gt=0)
    operator: OperatorSpec = OperatorSpec(name="superres", params={"factor": 2, "sigma": 0.1})
    mode: Literal["per-measurement", "amortised"] = "per-measurement"
    iterations: int = Field(600, ge=1)
    time_steps: int = Field(100, ge=3)
    trajectories: int = Field(64, ge=2)
    measurements_per_batch: int = Field(8, ge=1, description="amortised mode: M (K = trajectories / M per measurement)")
    lr: float = Field(1e-3, gt=0)
    likelihood_weight: float = Field(
        1.0, gt=0, le=100, description="fine-tune for p(x) p(y | x)^w and compare with that posterior (σ_y → σ_y/√w)"
    )
    hnet: HNetSpec = HNetSpec(architecture="mlp", time_embedding_dim=32, time_hidden=32)
    samples: int = Field(2000, ge=10)
    dps_sweep: list[float] = [0.03, 0.1, 0.3, 1.0, 3.0]
    precision: Precision = Field(
        "auto", description=PRECISION_HELP + "; the mixture's score is exact in float64 either way"
    )
    seed: Seed = 0
    device: str = "auto"
    run_dir: str | None = None


def posterior_metrics(
    samples: Tensor, posterior: GaussianMixturePosterior, reference: Tensor, generator: torch.Generator
) -> dict[str, Any]:
    """Errors of a sample set against the exact posterior."""
    mean = posterior.mean
    weights = posterior.responsibilities(samples).mean(0)
    return {
        "mean_rel_error": float((samples.double().mean(0) - mean).norm() / mean.norm()),
        "weight_tv": float(0.5 * (weights - posterior.weights).abs().sum()),
        "weights": [round(float(w), 4) for w in weights],
        "sliced_w2": sliced_w2(samples, reference, generator),
    }


def draw(sampler: Sampler, y: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return sampler.sample(y.expand(n, *y.shape[1:]), GeneratorNoise(generator)).cpu()


def draw_with_exact_score(
    prior: GaussianMixturePrior,
    posterior: GaussianMixturePosterior,
    n: int,
    time_steps: int,
    generator: torch.Generator,
) -> Tensor:
    """n samples of the same reverse SDE on the same grid, driven by the exact posterior score ∇ log p_t(x | y).

    What an h-network equal to the optimal control h* would give: the sampler's own
    discretisation error, the best deft can reach at ``time_steps``. Runs on the CPU (analytic score).
    """
    noise = GeneratorNoise(generator)
    return sample_reverse_sde(
        lambda x, t: posterior.score(x, t, prior.sde),
        prior.sde,
        noise((n, *prior.image_shape), "cpu"),
        reverse_time_grid(time_steps),
        noise,
    )


COVERAGE_METHODS = ("exact_posterior", "deft", "dps", "prior", "exact_score")


def coverage_section(
    prior: GaussianMixturePrior,
    likelihood: Operator,
    samplers: dict[str, Sampler],
    posterior: GaussianMixturePosterior,
    drawn: dict[str, Tensor],
    spec: GMMCheckSpec,
    device: torch.device,
) -> dict[str, Any]:
    """Coverage of each sampler's central credible intervals by truths with a known guarantee (module docstring).

    ``drawn`` holds the samples of the check's one measurement per method (and the exact posterior's),
    which per-measurement mode reuses; amortised mode draws k samples for each of P fresh measurements.
    """
    gen = torch.Generator().manual_seed(spec.seed + 3)
    if spec.mode == "per-measurement":
        truth = posterior.sample(spec.samples, gen)[None]
        samples = {method: drawn[method][None] for method in COVERAGE_METHODS}
        setup = {
            "truth": "draws of the exact posterior of the check's measurement",
            "measurements": 1,
            "truths_per_measurement": spec.samples,
        }
    else:
        k = max(calibration.minimum_samples(max(calibration.LEVELS)), spec.samples // COVERAGE_MEASUREMENTS)
        truth = prior.sample(COVERAGE_MEASUREMENTS, gen)
        ys = likelihood.measure(truth, generator=gen)
        posteriors = [exact_posterior(prior, likelihood, y) for y in ys]
        noise = GeneratorNoise(torch.Generator(device=device).manual_seed(spec.seed + 4))

        def sampled(method: str) -> Tensor:
            rows = ys.to(device).repeat_interleave(k, dim=0)
            return samplers[method].sample(rows, noise).cpu().reshape(-1, k, *prior.image_shape)

        samples = {
            "exact_posterior": torch.stack([post.sample(k, gen) for post in posteriors]),
            **{method: sampled(method) for method in ("deft", "dps", "prior")},
            "exact_score": torch.stack(
                [draw_with_exact_score(prior, post, k, spec.time_steps, gen) for post in posteriors]
            ),
        }
        setup = {
            "truth": "x* drawn from the prior, y = A x* + noise (σ_y/√w)",
            "measurements": COVERAGE_MEASUREMENTS,
            "truths_per_measurement": 1,
        }
    k = next(iter(samples.values())).shape[1]
    summaries = {
        method: calibration.summarise(calibration.per_image_calibration(s, truth), k) for method, s in samples.items()
    }
    return {**setup, "samples_per_measurement": k, **summaries}


def tempered_likelihood(name: str, operator: Operator, weight: float) -> Operator:
    """The operator whose likelihood is p(y | x)^w: σ_y/√w (for the exact posterior; measurements keep σ_y)."""
    return create(name, **{**operator.params.model_dump(), "sigma": operator.sigma / weight**0.5})


def select_dps_zeta(
    prior: GaussianMixturePrior,
    operator: Operator,
    likelihood: Operator,
    dps: DPSSampler,
    spec: GMMCheckSpec,
    device: torch.device,
) -> tuple[float, list[dict[str, float]]]:
    """ζ with the smallest mean posterior-mean error on measurements (by ``operator``) of *other* prior samples,
    against their exact posteriors under ``likelihood`` (the tempered one for a likelihood weight)."""
    gen = torch.Generator().manual_seed(spec.seed + 1000)
    problems = []
    for _ in range(SWEEP_MEASUREMENTS):
        x = prior.sample(1, gen)
        y = operator.measure(x, generator=gen)
        problems.append((y.to(device), exact_posterior(prior, likelihood, y[0])))
    table = []
    for zeta in spec.dps_sweep:
        errors = []
        for y, post in problems:
            samples = draw(
                dps.with_settings(dps_zeta=zeta),
                y,
                SWEEP_SAMPLES,
                torch.Generator(device=device).manual_seed(spec.seed),
            )
            errors.append(
                float((samples.double().mean(0) - post.mean).norm() / post.mean.norm())
                if torch.isfinite(samples).all()
                else float("inf")
            )
        table.append({"zeta": zeta, "mean_rel_error": sum(errors) / len(errors)})
    best = min(table, key=lambda row: row["mean_rel_error"])
    return best["zeta"], table


def check_gmm(spec: GMMCheckSpec) -> dict[str, Any]:
    device = resolve_device(spec.device)
    operator = create(spec.operator.name, **spec.operator.params)
    shape = tuple(spec.shape)
    operator.measurement_shape(shape)
    gen = torch.Generator().manual_seed(spec.seed)
    prior = hard_mixture(operator, shape, spec.components, spec.component_std, generator=gen)
    x_true = prior.sample(1, gen)
    y = operator.measure(x_true, generator=gen)
    likelihood = tempered_likelihood(spec.operator.name, operator, spec.likelihood_weight)
    posterior = exact_posterior(prior, likelihood, y[0])

    with tempfile.TemporaryDirectory(prefix="deft-check-gmm-") as scratch:
        work = Path(spec.run_dir) if spec.run_dir else Path(scratch) / "run"
        kept_inputs = (work.parent / f"{work.name}-prior", work.parent / f"{work.name}-y.safetensors")
        if spec.run_dir:  # the kept run's inputs go beside it: refuse before writing anything, never overwrite
            resolve_run_dir(FinetuneSpec(run_dir=str(work)), resume=False)
            for path in kept_inputs:
                if path.exists():
                    raise DeftError(
                        f"{path}: exists (--run-dir {work} keeps its prior and measurement there; "
                        "choose another --run-dir)"
                    )
        prior.save(kept_inputs[0])
        save_image(y[0], kept_inputs[1])
        amortised = spec.mode == "amortised"
        ft_spec = FinetuneSpec(
            prior={"path": str(kept_inputs[0])},
            operator=spec.operator,
            measurement=None if amortised else str(kept_inputs[1]),
            iterations=spec.iterations,
            time_steps=spec.time_steps,
            trajectories=max(2, spec.trajectories // spec.measurements_per_batch) if amortised else spec.trajectories,
            measurements_per_batch=spec.measurements_per_batch,
            lr=spec.lr,
            likelihood_weight=spec.likelihood_weight,
            hnet=spec.hnet,
            precision=spec.precision,
            seed=spec.seed,
            device=spec.device,
            run_dir=str(work),
            preview_every=max(1, spec.iterations // 4),
            checkpoint_every=max(1, spec.iterations // 4),
        )
        start = time.perf_counter()
        summary = finetune(ft_spec, quiet=True, command=["deft", "check", "gmm"])
        train_seconds = time.perf_counter() - start
        prior = prior.to(device)
        htransform, _ = load_htransform(work / "hnet_last.safetensors", prior)
    htransform = htransform.to(device).eval()
    runtime = Runtime.resolve(device, spec.precision)
    runtime.adapt(htransform)

    setup = SamplingSetup(prior, spec.time_steps, denoise_final=False)
    samplers = {method: build_sampler(method, setup, operator, htransform) for method in ("deft", "dps", "prior")}
    y_dev = y.to(device)
    ref_gen = torch.Generator().manual_seed(spec.seed + 1)
    reference = posterior.sample(spec.samples, ref_gen)
    floor = sliced_w2(posterior.sample(spec.samples, ref_gen), reference, torch.Generator().manual_seed(7))
    zeta, sweep = select_dps_zeta(prior, operator, likelihood, samplers["dps"], spec, device)
    samplers["dps"] = samplers["dps"].with_settings(dps_zeta=zeta)
    result: dict[str, Any] = {
        "problem": {
            "shape": list(shape),
            "components": spec.components,
            "component_std": spec.component_std,
            "operator": operator.describe(),
            "likelihood_weight": spec.likelihood_weight,
            "seed": spec.seed,
            "time_steps": spec.time_steps,
            "samples": spec.samples,
            "runtime": runtime.describe(),
            "exact_weights": [round(float(w), 4) for w in posterior.weights],
        },
        "exact": {"noise_floor_sliced_w2": floor},
    }
    if (
        spec.likelihood_weight != 1.0
    ):  # how far the tempered target is from the posterior: what a w-blind run would miss by
        untempered = exact_posterior(prior.cpu(), operator, y[0]).mean
        result["problem"]["posterior_mean_rel_distance_to_target"] = float(
            (untempered - posterior.mean).norm() / posterior.mean.norm()
        )
    drawn = {"exact_posterior": reference}
    for method in ("deft", "dps", "prior", "exact_score"):
        start = time.perf_counter()
        if method == "exact_score":
            exact_gen = torch.Generator().manual_seed(spec.seed + 2)
            samples = draw_with_exact_score(prior, posterior, spec.samples, spec.time_steps, exact_gen)
        else:
            samples = draw(
                samplers[method], y_dev, spec.samples, torch.Generator(device=device).manual_seed(spec.seed + 2)
            )
        metrics = posterior_metrics(samples, posterior, reference, torch.Generator().manual_seed(7))
        metrics["sliced_w2_over_floor"] = metrics["sliced_w2"] / floor
        metrics["sample_seconds"] = round(time.perf_counter() - start, 2)
        result[method] = metrics
        drawn[method] = samples
    result["coverage"] = coverage_section(prior, likelihood, samplers, posterior, drawn, spec, device)
    result["deft"].update(
        mode=spec.mode,
        iterations=summary["steps"],
        train_seconds=round(train_seconds, 1),
        skipped_steps=summary["skipped_steps"],
        hnet_parameters=htransform.num_parameters(),
    )
    result["dps"].update(zeta=zeta, sweep=sweep, sweep_on=f"{SWEEP_MEASUREMENTS} measurements of other prior samples")
    return result
