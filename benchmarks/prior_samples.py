"""Unconditional samples of a prior next to real images, to judge the prior by eye, plus simple statistics.

Draws ``-n`` samples with the reverse SDE (no x̂0 clipping, Tweedie-denoised last step) and writes
one PNG: the samples on the left, as many real images of the training data on the right. Also
compares per-channel means and standard deviations and the fraction of pixels outside [-1, 1]::

    python benchmarks/prior_samples.py --prior model_weights/petals32 --out model_weights/petals32/samples_vs_data.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deftcli.data import open_dataset
from deftcli.images import image_grid, save_image
from deftcli.methods import PriorSampler, SamplingSetup
from deftcli.priors import load_prior
from deftcli.samplers import GeneratorNoise
from deftcli.specs import DataSpec


def stats(x: torch.Tensor) -> dict[str, list[float] | float]:
    return {
        "channel_mean": [round(float(v), 3) for v in x.mean(dim=(0, 2, 3))],
        "channel_std": [round(float(v), 3) for v in x.std(dim=(0, 2, 3))],
        "outside_unit_range": round(float((x.abs() > 1).float().mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="model_weights/petals32")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("model_weights/petals32/samples_vs_data.png"))
    args = parser.parse_args()
    prior = load_prior(args.prior)
    sampler = PriorSampler(SamplingSetup(prior, args.steps, denoise_final=True))
    start = time.perf_counter()
    samples = torch.cat(
        [
            sampler.unconditional(16, torch.device("cpu"), GeneratorNoise(torch.Generator().manual_seed(args.seed + i)))
            for i in range(0, args.n, 16)
        ]
    )[: args.n]
    seconds = time.perf_counter() - start
    c, size = prior.image_shape[0], prior.image_shape[-1]
    real = open_dataset(DataSpec(), "val", size, c).batch(range(args.n))
    gap = torch.ones(1, c, size, size)
    rows = [torch.cat([samples[i : i + 8], gap, real[i : i + 8]]) for i in range(0, args.n, 8)]
    save_image(image_grid(rows), args.out)
    result = {
        "prior": prior.identity(),
        "samples": args.n,
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "samples_stats": stats(samples),
        "data_stats": stats(real),
        "grid": str(args.out),
        "layout": "left 8 columns: samples; right 8: petals val images",
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
