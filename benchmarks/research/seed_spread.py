"""How far deft's gap to DPS on petals val moves with the seeds of the measurements and of the samplers.

For one fine-tuned run at guidance scale γ and DPS at step size ζ (as ``sample_quality.py`` selected
them on train images), on the first ``--n`` val images: for each seed s of ``--seeds``, measurements
y = A x + σ_y ε drawn with seed s and k samples per image drawn with sampler seed s, then the
posterior-mean PSNR and SSIM of each method and the paired per-image difference deft − DPS (mean,
standard error, images above). Seed 0 reproduces ``sample_quality.py``'s measurements and samples.
Writes JSON and prints one line per seed::

    python benchmarks/research/seed_spread.py --run benchmarks/results/runs/sample_quality-…-w3 \\
        --guidance-scale 3 --dps-zeta 10 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_deft_against_dps_arguments(parser)
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds of the measurements and the samplers")
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/research/results/seed_spread.json"))

    run, images, x, methods = deft_against_dps(args)

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        y = run.operator.measure(x, generator=torch.Generator().manual_seed(seed))
        row = {"seed": seed, **deft_against_dps_row(methods, run.operator, x, y, images, args, seed)}
        rows.append(row)
        print(f"seed {seed}: {describe_gap(row)}", flush=True)

    gaps = [row["deft_minus_dps"]["mean_db"] for row in rows]
    result = {
        "setup": {
            "data": f"petals val, first {len(images)}",
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
        "seeds": rows,
        "deft_minus_dps_over_seeds": {
            "mean_db": round(statistics.mean(gaps), 4),
            "min_db": min(gaps),
            "max_db": max(gaps),
            "seeds_with_deft_above": sum(g > 0 for g in gaps),
            "seeds": len(gaps),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["deft_minus_dps_over_seeds"], indent=2))


if __name__ == "__main__":
    main()
