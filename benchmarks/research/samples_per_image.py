"""Posterior-mean PSNR against the number of samples per image, and deft against DPS at equal sampling time.

The posterior mean x̄_k = (1/k) Σ_j x^(j) of k samples has mean squared error
‖E[x | y] − x‖² + tr Cov[x | y] / k (for a sampler of the posterior), so its PSNR rises with k and a
sampler that is c× faster can average c× as many samples in the same time. For one fine-tuned run
at guidance scale γ and DPS at step size ζ, on the first ``--n`` val images with measurements drawn
once (seed 0), this draws ``-k`` samples per image with each method in this one process (the
per-(image, sample) noise streams of ``deft eval``, so the first 4 are ``sample_quality.py``'s k = 4
samples) and reports, for k = 1, 2, 4, … ≤ ``-k``, the PSNR and SSIM of the mean of the first k and
the seconds this took. The equal-time rows pair DPS at each k with deft at the largest k whose
seconds (at the seconds per sample measured here) do not exceed DPS's, where that k is below ``-k``
or ``-k`` + 1 would exceed them. Writes JSON and prints a table::

    python benchmarks/research/samples_per_image.py --run benchmarks/results/runs/sample_quality-…-w3 \\
        --guidance-scale 3 --dps-zeta 10 -k 16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where common.py is
from common import add_deft_against_dps_arguments, deft_against_dps, paired_difference, parse_with_evaluation_arguments

from deftcli.evaluate import per_image_metrics
from deftcli.metrics import psnr, ssim


def posterior_means_by_k(
    samples: torch.Tensor, x_true: torch.Tensor, seconds_per_sample: float
) -> dict[int, dict[str, object]]:
    """Per-image PSNR / SSIM of the mean of the first k samples of (n, k_max, C, H, W), for k = 1 … k_max."""
    rows = {}
    for k in range(1, samples.shape[1] + 1):
        mean = samples[:, :k].mean(1)
        rows[k] = {
            "psnr_mean": psnr(mean, x_true),
            "ssim_mean": ssim(mean, x_true),
            "seconds_per_image": k * seconds_per_sample,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_deft_against_dps_arguments(parser)
    parser.set_defaults(k=16)
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/research/results/samples_per_image.json"))

    run, images, x, methods = deft_against_dps(args)
    y = run.operator.measure(x, generator=torch.Generator().manual_seed(0))

    by_k = {}
    for name, sampler in methods.items():
        _, samples, seconds = per_image_metrics(sampler, run.operator, x, y, images, args.k, args.batch_size, seed=0)
        by_k[name] = posterior_means_by_k(samples, x, seconds / (len(images) * args.k))
        print(f"{name}: {seconds:.1f} s for {args.k} samples of {len(images)} images", flush=True)

    def summary(row: dict[str, object]) -> dict[str, float]:
        return {
            "psnr_mean": round(float(row["psnr_mean"].mean()), 4),
            "ssim_mean": round(float(row["ssim_mean"].mean()), 4),
            "seconds_per_image": round(row["seconds_per_image"], 3),
        }

    powers_of_two = [k for k in by_k["dps"] if k & (k - 1) == 0]
    equal_time = []
    for k_dps in powers_of_two:
        dps = by_k["dps"][k_dps]
        affordable = [k for k, row in by_k["deft"].items() if row["seconds_per_image"] <= dps["seconds_per_image"]]
        capped = (args.k + 1) * by_k["deft"][1]["seconds_per_image"] <= dps["seconds_per_image"]
        if affordable and not capped:
            k_deft = max(affordable)
            deft = by_k["deft"][k_deft]
            equal_time.append(
                {
                    "k_dps": k_dps,
                    "k_deft": k_deft,
                    "dps": summary(dps),
                    "deft": summary(deft),
                    "deft_minus_dps": paired_difference(deft["psnr_mean"], dps["psnr_mean"]),
                }
            )

    result = {
        "setup": {
            "data": f"petals val, first {len(images)}",
            "operator": run.operator.describe(),
            "time_steps": run.spec.time_steps,
            "run": str(args.run),
            "likelihood_weight": run.htransform.config.likelihood_weight,
            "guidance_scale": args.guidance_scale,
            "dps_zeta": args.dps_zeta,
            "measurement_seed": 0,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "by_k": {name: {str(k): summary(row) for k, row in rows.items()} for name, rows in by_k.items()},
        "same_k": {
            str(k): paired_difference(by_k["deft"][k]["psnr_mean"], by_k["dps"][k]["psnr_mean"]) for k in by_k["deft"]
        },
        "equal_time": equal_time,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("k    deft PSNR / SSIM / s     DPS PSNR / SSIM / s     deft − DPS")
    for k in powers_of_two:
        d, p, gap = result["by_k"]["deft"][str(k)], result["by_k"]["dps"][str(k)], result["same_k"][str(k)]
        print(
            f"{k:<4d} {d['psnr_mean']:.3f} / {d['ssim_mean']:.3f} / {d['seconds_per_image']:.2f}   "
            f"{p['psnr_mean']:.3f} / {p['ssim_mean']:.3f} / {p['seconds_per_image']:.2f}   "
            f"{gap['mean_db']:+.3f} ± {gap['standard_error_db']:.3f}"
        )
    for row in equal_time:
        print(
            f"equal time: deft k = {row['k_deft']} ({row['deft']['seconds_per_image']:.2f} s, "
            f"{row['deft']['psnr_mean']:.3f}) against "
            f"DPS k = {row['k_dps']} ({row['dps']['seconds_per_image']:.2f} s, {row['dps']['psnr_mean']:.3f}): "
            f"{row['deft_minus_dps']['mean_db']:+.3f} ± {row['deft_minus_dps']['standard_error_db']:.3f} dB"
        )


if __name__ == "__main__":
    main()
