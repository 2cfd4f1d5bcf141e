r"""The SOC objective of every sampler: how far each is from the model's posterior, next to its PSNR.

Each sampler here is the prior's Euler–Maruyama chain with a mean shift d_k per step: deft adds γ h to
the score (d_k = β_k Δs_k γ h), DPS subtracts ζ ∇_{x_t} ‖y − A x̂0(x_t)‖ after the step, and the learnt
schedule along the prior's Jacobian (``hnet_anatomy.py``) adds γ h_J. Every step is Gaussian with the
prior chain's covariance β_k Δs_k I, so the path measure q of a sampler has
KL(q ‖ prior chain) = E_q Σ_k ‖d_k‖² / (2 β_k Δs_k), and with D = ‖A x_N − y‖² / (2 σ_y²) at the
chain's last state x_N (t = ε)

    J_w = E_q[w D(x_N) + Σ_k ‖d_k‖² / (2 β_k Δs_k)] = KL(q ‖ p_w) − log Z_w(y),

where p_w is the prior chain reweighted by p(y | x_N)^w: the (tempered, w > 1) posterior's chain.
J_w is the SOC objective that deft fine-tunes with likelihood weight w (J = mean(D − T1) in
``deftcli/soc.py``). On the same measurements, differences of J_w between samplers are differences
of their KL divergence to that chain (which bounds the KL of their samples to the posterior).

For the runs of ``--run`` (labelled by their likelihood weight w), on the first ``--n`` val images
with measurements drawn once (seed 0) and ``-k`` chains per image with ``deft eval``'s noise
streams (so each sampler reproduces its posterior-mean PSNR in ``sample_quality.py`` /
``hnet_anatomy.py``), this reports per sampler E[D], the KL term, J_1 and J_w of every run's w, the
per-image difference of J_1 from the first sampler, and the posterior-mean PSNR; with
``--prior-truth`` the same on ground truths drawn from the prior. Writes JSON and prints a table::

    python benchmarks/research/soc_objective.py --run runs/…-w1 --run benchmarks/results/runs/sample_quality-…-w3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where common.py is
from common import PRIOR_TRUTH, parse_with_evaluation_arguments, prior_truth_images, val_images
from guided_chain import GuidedChainSampler, LearntScheduleAlongJacobian
from torch import Tensor

from deftcli.evaluate import sample_generators
from deftcli.htransform import ConditionalScore, HTransform
from deftcli.methods import Cost, DPSGuidance, SamplingSetup
from deftcli.metrics import psnr
from deftcli.operators import Operator
from deftcli.priors import Prior
from deftcli.runs import open_run
from deftcli.samplers import PerSampleNoise, ScoreFn


@dataclass(frozen=True)
class DeftChain(GuidedChainSampler):
    """deft as a guided chain: the control γ h, and Tweedie's x̂0 at the end under s_θ + γ h
    (the samples of :class:`deftcli.methods.DeftSampler` with the ``sde`` sampler)."""

    htransform: HTransform
    guidance_scale: float = 1.0

    method: ClassVar[str] = "deft"
    SETTINGS: ClassVar[dict[str, str]] = {"guidance_scale": "guidance_scale"}

    def steer(self, score_fn: ScoreFn, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The prior score and the control γ h(x_t, t, g), g at the prior's x̂0 (no correction)."""
        with torch.no_grad():
            score = score_fn(x, t)
            g = self.operator.likelihood_grad(self.setup.sde.tweedie_x0(x, score, t), y)
            return score, self.guidance_scale * self.htransform(x, t, g), torch.zeros_like(x)

    def final_score(self, y: Tensor) -> ScoreFn:
        return ConditionalScore(self.setup.prior, self.htransform, self.operator, y, self.guidance_scale)

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations(), hnet=self.setup.evaluations())


@dataclass(frozen=True)
class DPSChain(GuidedChainSampler):
    """DPS as a guided chain: the correction −ζ ∇_{x_t} ‖y − A x̂0(x_t)‖ (:class:`deftcli.methods.DPSGuidance`)
    (the samples of :class:`deftcli.methods.DPSSampler`)."""

    zeta: float

    method: ClassVar[str] = "dps"
    SETTINGS: ClassVar[dict[str, str]] = {"dps_zeta": "zeta"}

    def steer(self, score_fn: ScoreFn, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The prior score, no control, and DPS's correction."""
        score, correction = DPSGuidance(self.setup.sde, self.operator, y, self.zeta)(score_fn, x, t)
        return score, torch.zeros_like(x), correction

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations(), prior_backward=self.setup.steps - 1)


def controlled_chain(
    sampler: GuidedChainSampler, operator: Operator, y: Tensor, generators: list[torch.Generator]
) -> tuple[Tensor, Tensor, Tensor]:
    """One chain per row of y: (D(x_N) with w = 1, Σ_k ‖d_k‖²/(2 β_k Δs_k), the sample: Tweedie's x̂0 at t = ε)."""
    x, kl = sampler.chain(y, PerSampleNoise(generators))
    with torch.no_grad():
        data = (operator.A(x) - y).flatten(1).pow(2).sum(1) / (2 * operator.sigma**2)
    return data, kl, sampler.finish(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, action="append", required=True, help="a finished 4× super-resolution run, repeatable"
    )
    parser.add_argument("--gammas", default="1,3", help="deft's guidance scales γ, for every run")
    parser.add_argument(
        "--jacobian-gammas", default="1", help="γ of the learnt schedule along the prior's Jacobian, for every run"
    )
    parser.add_argument("--dps-zetas", default="3,10")
    parser.add_argument(
        "--prior-truth", type=int, default=32, help="also on this many ground truths drawn from the prior (0: none)"
    )
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/research/results/soc_objective.json"))

    opened = (open_run(path, torch.device("cpu")) for path in args.run)
    runs = {f"w{run.htransform.config.likelihood_weight:g}": run for run in opened}
    if not all(isinstance(run.htransform, HTransform) for run in runs.values()):
        raise SystemExit("every --run must be a fine-tuned run with an h-network")
    base = next(iter(runs.values()))
    weights = sorted({1.0, *(run.htransform.config.likelihood_weight for run in runs.values())})

    def setup(prior: Prior) -> SamplingSetup:
        """Every chain on the first run's grid, Tweedie-denoised at the end."""
        return SamplingSetup(prior, base.spec.time_steps, denoise_final=True)

    samplers: dict[str, GuidedChainSampler] = {}
    for label, run in runs.items():
        for gamma in (float(v) for v in args.gammas.split(",")):
            samplers[f"deft {label} γ {gamma:g}"] = DeftChain(setup(run.prior), run.operator, run.htransform, gamma)
    for label, run in runs.items():
        for gamma in (float(v) for v in args.jacobian_gammas.split(",")):
            along = LearntScheduleAlongJacobian(setup(run.prior), run.operator, run.htransform, guidance_scale=gamma)
            samplers[f"learnt schedule ({label}) along Jᵀg, γ {gamma:g}"] = along
    for zeta in (float(v) for v in args.dps_zetas.split(",")):
        samplers[f"DPS ζ {zeta:g}"] = DPSChain(setup(base.prior), base.operator, zeta)

    def evaluate(x: Tensor, y: Tensor) -> dict[str, dict[str, object]]:
        n, k = x.shape[0], args.k
        ys = y.repeat_interleave(k, dim=0)
        rows, first = {}, None
        for name, sampler in samplers.items():
            generators = sample_generators(0, range(n), k, y.device)
            batches = [slice(i, i + args.batch_size) for i in range(0, ys.shape[0], args.batch_size)]
            parts = [controlled_chain(sampler, base.operator, ys[rows], generators[rows]) for rows in batches]
            data, kl, x0 = (torch.cat(part) for part in zip(*parts))
            j1 = (data + kl).reshape(n, k).mean(1)
            first = j1 if first is None else first
            row = {
                "data_term": round(float(data.mean()), 2),
                "kl_to_prior_chain": round(float(kl.mean()), 2),
                **{f"J_{w:g}": round(float((w * data + kl).mean()), 2) for w in weights},
                "J_1_minus_first_sampler": {
                    "mean": round(float((j1 - first).mean()), 2),
                    "standard_error": round(float((j1 - first).std() / n**0.5), 2),
                },
                "psnr_mean": round(float(psnr(x0.reshape(n, k, *x0.shape[1:]).mean(1), x).mean()), 4),
            }
            rows[name] = row
            gap = row["J_1_minus_first_sampler"]
            print(
                f"{name:40s} E[D] {row['data_term']:9.2f}  KL term {row['kl_to_prior_chain']:10.2f}  "
                f"J_1 {row['J_1']:10.2f} ({gap['mean']:+10.2f} ± {gap['standard_error']:.2f})  "
                f"PSNR of the mean {row['psnr_mean']:.3f}",
                flush=True,
            )
        return rows

    images, x = val_images(base, args.n)
    y = base.operator.measure(x, generator=torch.Generator().manual_seed(0))
    print(f"petals val, first {len(images)}:", flush=True)
    results = {"val": evaluate(x, y)}
    if args.prior_truth:
        truth = prior_truth_images(base.prior, args.prior_truth)
        print(f"{args.prior_truth} {PRIOR_TRUTH}:", flush=True)
        truth_y = base.operator.measure(truth, generator=torch.Generator().manual_seed(0))
        results["prior_truth"] = evaluate(truth, truth_y)

    result = {
        "setup": {
            "data": f"petals val, first {len(images)}",
            "prior_truth": f"{args.prior_truth} {PRIOR_TRUTH}" if args.prior_truth else None,
            "operator": base.operator.describe(),
            "time_steps": base.spec.time_steps,
            "k": args.k,
            "runs": {label: str(path) for label, path in zip(runs, args.run)},
            "measurement_seed": 0,
            "threads": args.threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
