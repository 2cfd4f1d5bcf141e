"""deft against DPS as the ground truth moves from petals onto the prior's own images.

On petals val deft's posterior mean is level with DPS's or just below it; on images drawn from the
prior it is above (``sample_quality.py --prior-truth``). This measures what lies between. Each of
the first ``--n`` val images x is projected onto the prior by SDEdit from time t*:
x_{t*} = α(t*) x + σ(t*) ε, then the prior's reverse SDE from t* to ε (the 200-point grid of
``sample_quality.py``'s prior truth, cut at t*, Tweedie-denoised, clamped to [−1, 1]). t* = 0 leaves
petals as they are (the benchmark's table); as t* grows the truth keeps less of its petals detail
and more of what the prior draws, and t* = 1 is a sample of the prior independent of x. For each t*
the measurements are drawn with seed 0 and deft (one run at guidance scale γ) and DPS (step size
ζ), as ``sample_quality.py`` selected them on petals train images, draw k samples per image with
``deft eval``'s noise streams. Writes JSON and prints a line per t*::

    python benchmarks/research/prior_mismatch.py --run benchmarks/results/runs/sample_quality-…-w3 \\
        --guidance-scale 3 --dps-zeta 10 --t-star 0,0.1,0.2,0.3,0.5,1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where common.py is
from common import (
    add_deft_against_dps_arguments,
    deft_against_dps,
    deft_against_dps_row,
    describe_gap,
    parse_with_evaluation_arguments,
)

from deftcli.metrics import psnr
from deftcli.operators import Operator
from deftcli.priors import Prior
from deftcli.samplers import GeneratorNoise, sample_reverse_sde
from deftcli.sde import reverse_time_grid

PROJECTION_POINTS = 200


def project_onto_prior(prior: Prior, x: torch.Tensor, t_star: float, generator: torch.Generator) -> torch.Tensor:
    """SDEdit: noise x to t* and run the prior's reverse SDE back to ε (Tweedie-denoised, clamped); t* = 0 returns x."""
    if t_star == 0:
        return x
    s_start = 1.0 - t_star
    grid = [s_start, *(s for s in reverse_time_grid(PROJECTION_POINTS) if s > s_start)]
    x_t = prior.sde.perturb(x, torch.full((x.shape[0],), t_star), torch.randn(x.shape, generator=generator))
    x0 = sample_reverse_sde(prior.score, prior.sde, x_t, grid, GeneratorNoise(generator), denoise_final=True)
    return x0.clamp(-1, 1)


def null_space_energy(operator: Operator, x: torch.Tensor) -> float:
    """Mean square of (I − A†A) x on the [−1, 1] scale: the detail that y does not measure (for 4×
    super-resolution, x minus its 4×4 block means)."""
    return round(float((x - operator.A_dagger(operator.A(x))).square().mean()), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_deft_against_dps_arguments(parser)
    parser.add_argument(
        "--t-star", default="0,0.1,0.2,0.3,0.5,1", help="comma-separated SDEdit times t* of the projection"
    )
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/research/results/prior_mismatch.json"))

    run, images, petals, methods = deft_against_dps(args)

    rows = []
    for t_star in (float(t) for t in args.t_star.split(",")):
        x = project_onto_prior(run.prior, petals, t_star, torch.Generator().manual_seed(7))
        y = run.operator.measure(x, generator=torch.Generator().manual_seed(0))
        row = {
            "t_star": t_star,
            "truth_psnr_against_petals": round(float(psnr(x, petals).mean()), 3) if t_star > 0 else None,
            "truth_channel_std": [round(float(v), 4) for v in x.std(dim=(0, 2, 3))],
            "truth_null_space_energy": null_space_energy(run.operator, x),
            "dagger_psnr": round(float(psnr(run.operator.A_dagger(y), x).mean()), 4),
            **deft_against_dps_row(methods, run.operator, x, y, images, args, seed=0),
        }
        rows.append(row)
        against_petals = row["truth_psnr_against_petals"] or float("inf")
        print(f"t* {t_star:4.2f} (truth vs petals {against_petals:6.2f} dB): {describe_gap(row)}", flush=True)

    result = {
        "setup": {
            "data": f"petals val, first {len(images)}, projected onto the prior by SDEdit from t* "
            f"(seed 7, {PROJECTION_POINTS}-point grid)",
            "operator": run.operator.describe(),
            "time_steps": run.spec.time_steps,
            "k": args.k,
            "run": str(args.run),
            "likelihood_weight": run.htransform.config.likelihood_weight,
            "guidance_scale": args.guidance_scale,
            "dps_zeta": args.dps_zeta,
            "threads": args.threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "petals_channel_std": [round(float(v), 4) for v in petals.std(dim=(0, 2, 3))],
        "petals_null_space_energy": null_space_energy(run.operator, petals),
        "t_star": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
