"""What more than one benchmark script uses: the val-image benchmarks' options, images and summaries,
deft against DPS on one run, and the original 64×64 configuration of the device benchmarks.

A script in ``benchmarks/`` imports it as ``common``; one in ``benchmarks/research/`` puts
``benchmarks/`` on ``sys.path`` first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deftcli.checkpoint import save_weights, write_json
from deftcli.data import open_dataset
from deftcli.evaluate import per_image_metrics
from deftcli.methods import DeftSampler, DPSSampler, PriorSampler, Sampler, SamplingSetup
from deftcli.operators import Operator
from deftcli.priors import Prior
from deftcli.runs import FinetunedRun, open_run
from deftcli.samplers import GeneratorNoise
from deftcli.sde import VPSDE
from deftcli.unet import UNet, UNetConfig


def summarise(per_image: dict[str, torch.Tensor], seconds: float, n: int, k: int) -> dict[str, float]:
    return {
        **{key: round(float(v.mean()), 4) for key, v in per_image.items()},
        "seconds_per_image": round(seconds / n, 3),
        "k": k,
    }


PRIOR_TRUTH = "samples of the prior (200 steps, seed 123), clamped to [-1, 1]"


def prior_truth_images(prior: Prior, n: int) -> torch.Tensor:
    """n ground-truth images drawn from the prior itself (:data:`PRIOR_TRUTH`): there its posterior is the true one."""
    sampler = PriorSampler(SamplingSetup(prior, 200, denoise_final=True))
    return sampler.unconditional(n, torch.device("cpu"), GeneratorNoise(torch.Generator().manual_seed(123))).clamp(
        -1, 1
    )


def parse_with_evaluation_arguments(
    parser: argparse.ArgumentParser, out: Path, n: int = 64, k: int = 4
) -> argparse.Namespace:
    """Add the options every val-image benchmark shares (the benchmark's images, k, batch, threads, JSON
    path) with the defaults that make their measurements and samples the same, parse, and set the threads."""
    parser.add_argument("--n", type=int, default=n, help="the first n val images")
    parser.add_argument("-k", type=int, default=k, help="samples per image (posterior mean over k)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def add_deft_against_dps_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that compares one fine-tuned run at guidance scale γ with DPS at step size ζ."""
    parser.add_argument("--run", type=Path, required=True, help="a finished 4× super-resolution run")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="deft's γ")
    parser.add_argument("--dps-zeta", type=float, default=10.0, help="DPS's ζ")


def deft_against_dps(args: argparse.Namespace) -> tuple[FinetunedRun, list[int], torch.Tensor, dict[str, Sampler]]:
    """The run of ``--run``, the benchmark's val images (indices, pixels) and the two samplers: deft at
    ``--guidance-scale`` and DPS at ``--dps-zeta``, at the run's N with the Tweedie-denoised last step."""
    run = open_run(args.run, torch.device("cpu"))
    images, x = val_images(run, args.n)
    setup = SamplingSetup(run.prior, run.spec.time_steps, denoise_final=True)
    return (
        run,
        images,
        x,
        {
            "deft": DeftSampler(setup, run.operator, run.htransform, guidance_scale=args.guidance_scale),
            "dps": DPSSampler(setup, run.operator, zeta=args.dps_zeta),
        },
    )


def deft_against_dps_row(
    methods: dict[str, Sampler],
    operator: Operator,
    x: torch.Tensor,
    y: torch.Tensor,
    images: list[int],
    args: argparse.Namespace,
    seed: int,
) -> dict[str, object]:
    """deft's and DPS's k samples per image for measurements y of truths x (sampler seed ``seed``): each
    method's summary and the paired per-image difference of their posterior-mean PSNR, deft − DPS."""
    per_method = {
        name: per_image_metrics(sampler, operator, x, y, images, args.k, args.batch_size, seed=seed)
        for name, sampler in methods.items()
    }
    return {
        **{
            name: summarise(per_image, seconds, len(images), args.k)
            for name, (per_image, _, seconds) in per_method.items()
        },
        "deft_minus_dps": paired_difference(per_method["deft"][0]["psnr_mean"], per_method["dps"][0]["psnr_mean"]),
    }


def describe_gap(row: dict[str, object]) -> str:
    """One line for a :func:`deft_against_dps_row`."""
    gap = row["deft_minus_dps"]
    return (
        f"PSNR mean deft {row['deft']['psnr_mean']:.3f}, DPS {row['dps']['psnr_mean']:.3f}; "
        f"deft − DPS {gap['mean_db']:+.3f} "
        f"± {gap['standard_error_db']:.3f} dB, above on {gap['images_above']} of {gap['images']}"
    )


def val_images(run: FinetunedRun, n: int) -> tuple[list[int], torch.Tensor]:
    """The benchmark's images: the indices and pixels of the first n images of the run's val split."""
    data = open_dataset(run.spec.data, "val", run.prior.image_shape[-1], run.prior.image_shape[0])
    images = list(range(min(n, len(data))))
    return images, data.batch(images)


def paired_difference(psnr: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per-image posterior-mean PSNR minus the reference's on the same images: mean, its standard error, and the
    images above."""
    difference = psnr - reference
    return {
        "mean_db": round(float(difference.mean()), 4),
        "standard_error_db": round(float(difference.std() / difference.numel() ** 0.5), 4),
        "images_above": int((difference > 0).sum()),
        "images": difference.numel(),
    }


# The original Flowers102 experiment's sizes: its prior UNet, its h-network, 64×64 images, batch 14
# (one measurement × 14 trajectories), 4× super-resolution at σ_y = 0.05.
ORIGINAL_PRIOR = {
    "model_channels": 64,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "max_period": 0.005,
}
ORIGINAL_HNET = {"model_channels": 32, "channel_mult": [1, 2], "space_to_depth": 1}
SIZE, BATCH, FACTOR, SIGMA_Y = 64, 14, 4, 0.05


def write_random_prior(folder: Path) -> None:
    """A deft prior folder with a randomly initialised UNet of the original's sizes (cost does not depend on the
    weights)."""
    config = UNetConfig(**ORIGINAL_PRIOR)
    torch.manual_seed(0)
    unet = UNet(config, VPSDE().sigma)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_weights(unet.state_dict(), folder / "model.safetensors")
    write_json(
        {
            "format": "deft-unet-prior",
            "name": "random-original-size",
            "image_shape": [3, SIZE, SIZE],
            "sde": {"beta_min": 0.1, "beta_max": 20.0},
            "unet": config.model_dump(mode="json"),
        },
        folder / "config.json",
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
