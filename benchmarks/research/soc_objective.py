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
from collections.abc import Callable
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where common.py is
from common import PRIOR_TRUTH, Guidance, LearntScheduleAlongJacobian, guided_chain, parse_with_evaluation_arguments, prior_truth_images, val_images
from torch import Tensor

from deftcli.evaluate import psnr, sample_generators
from deftcli.htransform import ConditionalScore, HTransform, guidance_inputs
from deftcli.methods import Reconstructor, dps_correction
from deftcli.runs import FinetunedRun, open_run
from deftcli.samplers import ScoreFn, denoise

def deft_guidance(run: FinetunedRun, gamma: float) -> Guidance:
    def guidance(x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        score, g = guidance_inputs(run.prior, run.operator, x, t, y)
        with torch.no_grad():
            return score, gamma * run.htransform(x, t, g), torch.zeros_like(x)

    return guidance


def dps_guidance(run: FinetunedRun, zeta: float) -> Guidance:
    def guidance(x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        score, correction = dps_correction(run.prior.score, run.prior.sde, run.operator, y, x, t, zeta)
        return score, torch.zeros_like(x), correction

    return guidance


def controlled_chain(run: FinetunedRun, grid: list[float], y: Tensor, generators: list[torch.Generator], guidance: Guidance,
                     final_score: ScoreFn) -> tuple[Tensor, Tensor, Tensor]:
    """One chain per row of y: (D(x_N) with w = 1, Σ_k ‖d_k‖²/(2 β_k Δs_k), Tweedie's x̂0 at t = ε under ``final_score``)."""
    x, kl = guided_chain(run.prior, grid, y, generators, guidance)
    with torch.no_grad():
        data = (run.operator.A(x) - y).flatten(1).pow(2).sum(1) / (2 * run.operator.sigma**2)
    return data, kl, denoise(final_score, run.prior.sde, x, grid[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="a finished 4× super-resolution run, repeatable")
    parser.add_argument("--gammas", default="1,3", help="deft's guidance scales γ, for every run")
    parser.add_argument("--jacobian-gammas", default="1", help="γ of the learnt schedule along the prior's Jacobian, for every run")
    parser.add_argument("--dps-zetas", default="3,10")
    parser.add_argument("--prior-truth", type=int, default=32, help="also on this many ground truths drawn from the prior (0: none)")
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/research/results/soc_objective.json"))

    runs = {f"w{run.htransform.config.likelihood_weight:g}": run for run in (open_run(path, torch.device("cpu")) for path in args.run)}
    if not all(isinstance(run.htransform, HTransform) for run in runs.values()):
        raise SystemExit("every --run must be a fine-tuned run with an h-network")
    base = next(iter(runs.values()))
    grid = Reconstructor(base.prior, base.operator, None, base.spec.time_steps).grid
    weights = sorted({1.0, *(run.htransform.config.likelihood_weight for run in runs.values())})

    samplers: list[tuple[str, Guidance, Callable[[Tensor], ScoreFn]]] = []
    for label, run in runs.items():
        for gamma in (float(v) for v in args.gammas.split(",")):
            samplers.append((f"deft {label} γ {gamma:g}", deft_guidance(run, gamma),
                             lambda y, run=run, gamma=gamma: ConditionalScore(run.prior, run.htransform, run.operator, y, gamma)))
    for label, run in runs.items():
        for gamma in (float(v) for v in args.jacobian_gammas.split(",")):
            along = LearntScheduleAlongJacobian(run.prior, run.operator, run.htransform, run.spec.time_steps, guidance_scale=gamma)
            samplers.append((f"learnt schedule ({label}) along Jᵀg, γ {gamma:g}", along.guidance, lambda y: base.prior.score))
    for zeta in (float(v) for v in args.dps_zetas.split(",")):
        samplers.append((f"DPS ζ {zeta:g}", dps_guidance(base, zeta), lambda y: base.prior.score))

    def evaluate(x: Tensor, y: Tensor) -> dict[str, dict[str, object]]:
        n, k = x.shape[0], args.k
        ys = y.repeat_interleave(k, dim=0)
        rows, first = {}, None
        for name, guidance, final_score in samplers:
            generators = sample_generators(0, range(n), k, y.device)
            parts = [controlled_chain(base, grid, ys[i : i + args.batch_size], generators[i : i + args.batch_size], guidance,
                                      final_score(ys[i : i + args.batch_size]))
                     for i in range(0, ys.shape[0], args.batch_size)]
            data, kl, x0 = (torch.cat(part) for part in zip(*parts))
            j1 = (data + kl).reshape(n, k).mean(1)
            first = j1 if first is None else first
            row = {"data_term": round(float(data.mean()), 2), "kl_to_prior_chain": round(float(kl.mean()), 2),
                   **{f"J_{w:g}": round(float((w * data + kl).mean()), 2) for w in weights},
                   "J_1_minus_first_sampler": {"mean": round(float((j1 - first).mean()), 2), "standard_error": round(float((j1 - first).std() / n**0.5), 2)},
                   "psnr_mean": round(float(psnr(x0.reshape(n, k, *x0.shape[1:]).mean(1), x).mean()), 4)}
            rows[name] = row
            gap = row["J_1_minus_first_sampler"]
            print(f"{name:40s} E[D] {row['data_term']:9.2f}  KL term {row['kl_to_prior_chain']:10.2f}  J_1 {row['J_1']:10.2f} "
                  f"({gap['mean']:+10.2f} ± {gap['standard_error']:.2f})  PSNR of the mean {row['psnr_mean']:.3f}", flush=True)
        return rows

    images, x = val_images(base, args.n)
    y = base.operator.measure(x, generator=torch.Generator().manual_seed(0))
    print(f"petals val, first {len(images)}:", flush=True)
    results = {"val": evaluate(x, y)}
    if args.prior_truth:
        truth = prior_truth_images(Reconstructor(base.prior, base.operator, None, base.spec.time_steps), args.prior_truth)
        print(f"{args.prior_truth} {PRIOR_TRUTH}:", flush=True)
        results["prior_truth"] = evaluate(truth, base.operator.measure(truth, generator=torch.Generator().manual_seed(0)))

    result = {
        "setup": {"data": f"petals val, first {len(images)}", "prior_truth": f"{args.prior_truth} {PRIOR_TRUTH}" if args.prior_truth else None,
                  "operator": base.operator.describe(), "time_steps": base.spec.time_steps, "k": args.k, "runs": {label: str(path) for label, path in zip(runs, args.run)},
                  "measurement_seed": 0, "threads": args.threads, "torch": torch.__version__, "platform": platform.platform()},
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
