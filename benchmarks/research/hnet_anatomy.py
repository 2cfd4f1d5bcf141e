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
from dataclasses import dataclass, replace
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where common.py is
from common import (PRIOR_TRUTH, GuidedChainSampler, LearntScheduleAlongJacobian, parse_with_evaluation_arguments, prior_truth_images,
                    sample_norm, summarise, val_images)
from torch import Tensor, nn

from deftcli.evaluate import per_image_metrics, sample_generators
from deftcli.htransform import GaussianGuidance, HTransform, guidance_inputs
from deftcli.methods import Reconstructor
from deftcli.runs import open_run
from deftcli.samplers import gaussian, reverse_sde_step, standard_noise, time_batch


class GradientTermOnly(nn.Module):
    """An h-network with NN_φ removed: h = −(c_0 + c_ψ(t)) w g."""

    def __init__(self, htransform: HTransform) -> None:
        super().__init__()
        self.htransform, self.config = htransform, htransform.config

    def forward(self, x: Tensor, t: Tensor, g: Tensor) -> Tensor:
        return -self.htransform.scale(t) * self.htransform.weighted(g)


@dataclass
class JacobianFreeDPS(GuidedChainSampler):
    """DPS with the prior's Jacobian dropped: after each prior step, x ← x − ζ Aᵀ(A x̂0 − y)/‖A x̂0 − y‖."""

    def guidance(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert self.operator is not None
        with torch.no_grad():
            score = self.prior.score(x, t)
            residual = self.operator.A(self.prior.sde.tweedie_x0(x, score, t)) - y
            step = self.operator.A_adjoint(residual) / sample_norm(residual)
            return score, torch.zeros_like(x), -self.dps_zeta * step


def trace(rec: Reconstructor, y: Tensor, reference: GaussianGuidance, every: int) -> list[dict[str, float]]:
    """Per-step anatomy of h along deft's own trajectories (γ = 1) for measurements y."""
    htransform, prior, sde, grid = rec.htransform, rec.prior, rec.prior.sde, rec.grid
    generators = sample_generators(0, range(y.shape[0]), 1, y.device)
    x = gaussian((y.shape[0], *prior.image_shape), generators, y.device)
    rows = []
    with torch.no_grad():
        for k in range(len(grid) - 1):
            t = time_batch(grid[k], x)
            score, g = guidance_inputs(prior, rec.operator, x, t, y)
            wg = htransform.weighted(g)
            network = htransform.network(x, t, wg)
            h = network - htransform.scale(t) * wg
            if k % every == 0 or k == len(grid) - 2:
                rows.append({
                    "t": round(1 - grid[k], 4),
                    "h_norm": round(float(h.flatten(1).norm(dim=1).mean()), 3),
                    "network_norm": round(float(network.flatten(1).norm(dim=1).mean()), 3),
                    "cos_h_minus_wg": round(float(nn.functional.cosine_similarity(h.flatten(1), -wg.flatten(1), dim=1).mean()), 4),
                    "wg_norm": round(float(wg.flatten(1).norm(dim=1).mean()), 3),
                    "learnt_scale": round(float(htransform.scale(t[:1]).flatten()[0]), 5),
                    "gaussian_scale": round(float(reference.scale(t[:1], sde).flatten()[0]), 5),
                })
            x = reverse_sde_step(sde, x, t, grid[k + 1] - grid[k], score + h, standard_noise(x, generators))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished 4× super-resolution run")
    parser.add_argument("--gammas", default="1,3", help="deft's guidance scales γ")
    parser.add_argument("--dps-zeta", type=float, default=10.0)
    parser.add_argument("--jacobian-free-zetas", default="3,10,30")
    parser.add_argument("--jacobian-gammas", default="1,1.5,2", help="γ of the learnt schedule along the prior's Jacobian")
    parser.add_argument("--jacobian-part-gamma", type=float, default=2.0,
                        help="γ at which the Jacobian direction's range and null-space parts are evaluated apart")
    parser.add_argument("--prior-truth", type=int, default=32,
                        help="also evaluate every sampler on this many ground truths drawn from the prior (0: none)")
    parser.add_argument("--trace-images", type=int, default=32)
    parser.add_argument("--trace-every", type=int, default=4, help="record every this many steps (and the last)")
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/research/results/hnet_anatomy.json"))

    run = open_run(args.run, torch.device("cpu"))
    if not isinstance(run.htransform, HTransform):
        raise SystemExit(f"{args.run}: not a fine-tuned run with an h-network")
    images, x = val_images(run, args.n)
    rec = Reconstructor(run.prior, run.operator, run.htransform, run.spec.time_steps, denoise_final=True)
    reference = GaussianGuidance(sigma_y=run.operator.sigma, gram_norm=run.operator.gram_norm(run.prior.image_shape),
                                 data_variance=run.prior.pixel_variance())

    y = run.operator.measure(x, generator=torch.Generator().manual_seed(0))
    steps = trace(rec, y[: args.trace_images], reference, args.trace_every)
    for row in steps:
        print(" ".join(f"{key} {value}" for key, value in row.items()), flush=True)

    def evaluate_samplers(x: Tensor, y: Tensor, images: list[int]) -> dict[str, dict[str, float]]:
        """Every sampler of this script on ground truths x and their measurements y, PSNR etc. of the posterior mean."""

        def evaluate(name: str, method_rec: Reconstructor, method: str) -> dict[str, float]:
            per_image, _, seconds = per_image_metrics(method_rec, method, x, y, images, args.k, args.batch_size, seed=0)
            summary = summarise(per_image, seconds, len(images), args.k)
            print(f"{name}: PSNR of the posterior mean {summary['psnr_mean']:.3f}, SSIM {summary['ssim_mean']:.3f}, "
                  f"residual {summary['data_residual']:.3f}", flush=True)
            return summary

        results: dict[str, dict[str, float]] = {}
        for gamma in (float(v) for v in args.gammas.split(",")):
            results[f"deft_gamma_{gamma:g}"] = evaluate(f"deft γ {gamma:g}", replace(rec, guidance_scale=gamma), "deft")
            without = replace(rec, htransform=GradientTermOnly(run.htransform), guidance_scale=gamma)  # type: ignore[arg-type]
            results[f"deft_without_network_gamma_{gamma:g}"] = evaluate(f"deft without NN_φ, γ {gamma:g}", without, "deft")
        for gamma in (float(v) for v in args.jacobian_gammas.split(",")):
            along = LearntScheduleAlongJacobian(run.prior, run.operator, run.htransform, run.spec.time_steps, guidance_scale=gamma)
            results[f"learnt_schedule_along_jacobian_gamma_{gamma:g}"] = evaluate(f"learnt schedule along Jᵀg, γ {gamma:g}", along, "along-jacobian")
        for part in ("range", "null-space"):
            along = LearntScheduleAlongJacobian(run.prior, run.operator, run.htransform, run.spec.time_steps, guidance_scale=args.jacobian_part_gamma,
                                                part=part)
            results[f"learnt_schedule_along_jacobian_{part}_gamma_{args.jacobian_part_gamma:g}"] = evaluate(
                f"learnt schedule along the {part} part of Jᵀg, γ {args.jacobian_part_gamma:g}", along, f"along-jacobian-{part}")
        results[f"dps_zeta_{args.dps_zeta:g}"] = evaluate(f"DPS ζ {args.dps_zeta:g}", replace(rec, dps_zeta=args.dps_zeta), "dps")
        for zeta in (float(v) for v in args.jacobian_free_zetas.split(",")):
            jacobian_free = JacobianFreeDPS(run.prior, run.operator, None, run.spec.time_steps, dps_zeta=zeta)
            results[f"jacobian_free_dps_zeta_{zeta:g}"] = evaluate(f"Jacobian-free DPS ζ {zeta:g}", jacobian_free, "jacobian-free-dps")
        return results

    results = evaluate_samplers(x, y, images)
    prior_truth = None
    if args.prior_truth:
        print(f"on {args.prior_truth} {PRIOR_TRUTH}:", flush=True)
        truth = prior_truth_images(rec, args.prior_truth)
        truth_y = run.operator.measure(truth, generator=torch.Generator().manual_seed(0))
        prior_truth = {"images": f"{args.prior_truth} {PRIOR_TRUTH}", "posterior_mean": evaluate_samplers(truth, truth_y, list(range(args.prior_truth)))}

    result = {
        "setup": {"data": f"petals val, first {len(images)}", "operator": run.operator.describe(), "time_steps": run.spec.time_steps, "k": args.k,
                  "run": str(args.run), "likelihood_weight": run.htransform.config.likelihood_weight,
                  "gaussian_start": run.htransform.config.guidance is not None, "trace_images": args.trace_images, "threads": args.threads,
                  "torch": torch.__version__, "platform": platform.platform()},
        "trace_gamma_1": steps,
        "posterior_mean": results,
        "prior_truth": prior_truth,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
