"""What a fine-tuned h-network has learnt: its scaled-gradient term against its network term NN_φ.

h(x_t, t, y) = NN_φ([w g, x_t], t) − (c_0(t) + c_ψ(t)) w g, with g = Aᵀ(A x̂0 − y)/σ_y² the likelihood
gradient at the prior's Tweedie x̂0 (no Jacobian of the prior). For one fine-tuned run this script

1. traces deft's reverse SDE (γ = 1) on the first ``--trace-images`` val measurements and records, at
   each step, ‖h‖, ‖NN_φ‖, cos(h, −w g), ‖w g‖, the learnt scale c_0 + c_ψ and, for reference, the
   exact scale of the prior's Gaussian approximation c_G(t) (:class:`deftcli.htransform.GaussianGuidance`);
2. on the first ``--n`` val images (measurements and sampler noise of ``sample_quality.py``, seed 0)
   reports the posterior-mean PSNR / SSIM and data residual of deft with its h and with NN_φ removed
   (h = −(c_0 + c_ψ) w g), at each γ; DPS at ζ; and a Jacobian-free DPS, whose step uses
   Aᵀ(A x̂0 − y)/‖A x̂0 − y‖ in place of ∇_{x_t}‖y − A x̂0(x_t)‖ (no backpropagation through the prior),
   at each of ``--jacobian-free-zetas``; and the learnt schedule applied along the prior's Jacobian
   (:class:`LearntScheduleAlongJacobian`, at each of ``--jacobian-gammas``): what NN_φ could add by
   learning that direction; and, at ``--jacobian-part-gamma``, the same along the Jacobian direction's
   part in range(Aᵀ) alone and with only its null-space part added to g: which of the two carries the
   gain. The val figures are read off, not used to select anything;
3. evaluates the same samplers on ``--prior-truth`` ground truths drawn from the prior itself
   (``sample_quality.py``'s, measurement seed 0), where the model's posterior is the true one: what
   each gains there is posterior accuracy, and what it gains only on petals makes up for the prior's
   mismatch with the data.

    python benchmarks/research/hnet_anatomy.py --run benchmarks/results/runs/sample_quality-…-w3 --gammas 1,3

Writes ``benchmarks/research/results/hnet_anatomy.json`` and prints one line per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where common.py is
from common import PRIOR_TRUTH, parse_with_evaluation_arguments, prior_truth_images, summarise, val_images
from guided_chain import GuidedChainSampler, LearntScheduleAlongJacobian, sample_norm
from torch import Tensor, nn
from torch.nn.functional import cosine_similarity

from deftcli.evaluate import per_image_metrics, sample_generators
from deftcli.htransform import GaussianGuidance, HTransform, guidance_inputs
from deftcli.methods import Cost, DeftSampler, DPSSampler, Sampler, SamplingSetup
from deftcli.operators import Operator
from deftcli.priors import Prior
from deftcli.runs import open_run
from deftcli.samplers import PerSampleNoise, ReverseStep, ScoreFn, sample_reverse_sde


class GradientTermOnly(nn.Module):
    """An h-network with NN_φ removed: h = −(c_0 + c_ψ(t)) w g."""

    def __init__(self, htransform: HTransform) -> None:
        super().__init__()
        self.htransform, self.config = htransform, htransform.config

    def forward(self, x: Tensor, t: Tensor, g: Tensor) -> Tensor:
        return -self.htransform.scale(t) * self.htransform.weighted(g)


@dataclass(frozen=True)
class JacobianFreeDPS(GuidedChainSampler):
    """DPS with the prior's Jacobian dropped: after each prior step, x ← x − ζ Aᵀ(A x̂0 − y)/‖A x̂0 − y‖."""

    zeta: float

    method: ClassVar[str] = "jacobian-free-dps"
    SETTINGS: ClassVar[dict[str, str]] = {"dps_zeta": "zeta"}

    def steer(self, score_fn: ScoreFn, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The prior score, no control, and the correction −ζ Aᵀ(A x̂0 − y)/‖A x̂0 − y‖."""
        with torch.no_grad():
            score = score_fn(x, t)
            residual = self.operator.A(self.setup.sde.tweedie_x0(x, score, t)) - y
            step = self.operator.A_adjoint(residual) / sample_norm(residual)
            return score, torch.zeros_like(x), -self.zeta * step

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations())


class AnatomyScore:
    """deft's score at γ = 1, s_θ + h with h = NN_φ([w g, x_t], t) − (c_0 + c_ψ(t)) w g, that keeps
    (w g, NN_φ, h) of its latest evaluation in :attr:`last` for the trace's per-step callback."""

    def __init__(self, prior: Prior, htransform: HTransform, operator: Operator, y: Tensor) -> None:
        self.prior, self.htransform, self.operator, self.y = prior, htransform, operator, y
        self.last: tuple[Tensor, Tensor, Tensor] | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        htransform = self.htransform
        score, g = guidance_inputs(self.prior, self.operator, x, t, self.y)
        with torch.no_grad():
            wg = htransform.weighted(g)
            network = htransform.network(x, t, wg)
            h = network - htransform.scale(t) * wg
            self.last = (wg, network, h)
            return score + h


def trace(sampler: DeftSampler, y: Tensor, reference: GaussianGuidance, every: int) -> list[dict[str, float]]:
    """Per-step anatomy of h along deft's own trajectories (γ = 1) for measurements y."""
    setup, htransform = sampler.setup, sampler.htransform
    grid, score = setup.grid, AnatomyScore(setup.prior, htransform, sampler.operator, y)
    rows = []

    def record(step: ReverseStep) -> None:
        if step.k % every and step.k != len(grid) - 2:
            return
        assert score.last is not None
        wg, network, h = score.last
        t = step.t
        rows.append(
            {
                "t": round(1 - grid[step.k], 4),
                "h_norm": round(float(h.flatten(1).norm(dim=1).mean()), 3),
                "network_norm": round(float(network.flatten(1).norm(dim=1).mean()), 3),
                "cos_h_minus_wg": round(float(cosine_similarity(h.flatten(1), -wg.flatten(1), dim=1).mean()), 4),
                "wg_norm": round(float(wg.flatten(1).norm(dim=1).mean()), 3),
                "learnt_scale": round(float(htransform.scale(t[:1]).flatten()[0]), 5),
                "gaussian_scale": round(float(reference.scale(t[:1], setup.sde).flatten()[0]), 5),
            }
        )

    noise = PerSampleNoise(sample_generators(0, range(y.shape[0]), 1, y.device))
    sample_reverse_sde(score, setup.sde, setup.start(y.shape[0], y.device, noise), grid, noise, callback=record)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished 4× super-resolution run")
    parser.add_argument("--gammas", default="1,3", help="deft's guidance scales γ")
    parser.add_argument("--dps-zeta", type=float, default=10.0)
    parser.add_argument("--jacobian-free-zetas", default="3,10,30")
    parser.add_argument(
        "--jacobian-gammas", default="1,1.5,2", help="γ of the learnt schedule along the prior's Jacobian"
    )
    parser.add_argument(
        "--jacobian-part-gamma",
        type=float,
        default=2.0,
        help="γ at which the Jacobian direction's range and null-space parts are evaluated apart",
    )
    parser.add_argument(
        "--prior-truth",
        type=int,
        default=32,
        help="also evaluate every sampler on this many ground truths drawn from the prior (0: none)",
    )
    parser.add_argument("--trace-images", type=int, default=32)
    parser.add_argument("--trace-every", type=int, default=4, help="record every this many steps (and the last)")
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/research/results/hnet_anatomy.json"))

    run = open_run(args.run, torch.device("cpu"))
    if not isinstance(run.htransform, HTransform):
        raise SystemExit(f"{args.run}: not a fine-tuned run with an h-network")
    images, x = val_images(run, args.n)
    setup = SamplingSetup(run.prior, run.spec.time_steps, denoise_final=True)
    deft = DeftSampler(setup, run.operator, run.htransform)
    reference = GaussianGuidance(
        sigma_y=run.operator.sigma,
        gram_norm=run.operator.gram_norm(run.prior.image_shape),
        data_variance=run.prior.pixel_variance(),
    )

    y = run.operator.measure(x, generator=torch.Generator().manual_seed(0))
    steps = trace(deft, y[: args.trace_images], reference, args.trace_every)
    for row in steps:
        print(" ".join(f"{key} {value}" for key, value in row.items()), flush=True)

    def evaluate_samplers(x: Tensor, y: Tensor, images: list[int]) -> dict[str, dict[str, float]]:
        """Every sampler of this script on ground truths x and their measurements y, PSNR etc. of the posterior mean."""

        def evaluate(name: str, sampler: Sampler | GuidedChainSampler) -> dict[str, float]:
            per_image, _, seconds = per_image_metrics(
                sampler, run.operator, x, y, images, args.k, args.batch_size, seed=0
            )
            summary = summarise(per_image, seconds, len(images), args.k)
            print(
                f"{name}: PSNR of the posterior mean {summary['psnr_mean']:.3f}, SSIM {summary['ssim_mean']:.3f}, "
                f"residual {summary['data_residual']:.3f}",
                flush=True,
            )
            return summary

        results: dict[str, dict[str, float]] = {}
        for gamma in (float(v) for v in args.gammas.split(",")):
            results[f"deft_gamma_{gamma:g}"] = evaluate(f"deft γ {gamma:g}", deft.with_settings(guidance_scale=gamma))
            gradient_term = GradientTermOnly(run.htransform)
            without = replace(deft, htransform=gradient_term, guidance_scale=gamma)  # type: ignore[arg-type]
            results[f"deft_without_network_gamma_{gamma:g}"] = evaluate(f"deft without NN_φ, γ {gamma:g}", without)
        along = LearntScheduleAlongJacobian(setup, run.operator, run.htransform)
        for gamma in (float(v) for v in args.jacobian_gammas.split(",")):
            results[f"learnt_schedule_along_jacobian_gamma_{gamma:g}"] = evaluate(
                f"learnt schedule along Jᵀg, γ {gamma:g}", along.with_settings(guidance_scale=gamma)
            )
        for part in ("range", "null-space"):
            results[f"learnt_schedule_along_jacobian_{part}_gamma_{args.jacobian_part_gamma:g}"] = evaluate(
                f"learnt schedule along the {part} part of Jᵀg, γ {args.jacobian_part_gamma:g}",
                along.with_settings(guidance_scale=args.jacobian_part_gamma, part=part),
            )
        dps = DPSSampler(setup, run.operator, zeta=args.dps_zeta)
        results[f"dps_zeta_{args.dps_zeta:g}"] = evaluate(f"DPS ζ {args.dps_zeta:g}", dps)
        for zeta in (float(v) for v in args.jacobian_free_zetas.split(",")):
            jacobian_free = JacobianFreeDPS(setup, run.operator, zeta)
            results[f"jacobian_free_dps_zeta_{zeta:g}"] = evaluate(f"Jacobian-free DPS ζ {zeta:g}", jacobian_free)
        return results

    results = evaluate_samplers(x, y, images)
    prior_truth = None
    if args.prior_truth:
        print(f"on {args.prior_truth} {PRIOR_TRUTH}:", flush=True)
        truth = prior_truth_images(run.prior, args.prior_truth)
        truth_y = run.operator.measure(truth, generator=torch.Generator().manual_seed(0))
        prior_truth = {
            "images": f"{args.prior_truth} {PRIOR_TRUTH}",
            "posterior_mean": evaluate_samplers(truth, truth_y, list(range(args.prior_truth))),
        }

    result = {
        "setup": {
            "data": f"petals val, first {len(images)}",
            "operator": run.operator.describe(),
            "time_steps": run.spec.time_steps,
            "k": args.k,
            "run": str(args.run),
            "likelihood_weight": run.htransform.config.likelihood_weight,
            "gaussian_start": run.htransform.config.guidance is not None,
            "trace_images": args.trace_images,
            "threads": args.threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "trace_gamma_1": steps,
        "posterior_mean": results,
        "prior_truth": prior_truth,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
