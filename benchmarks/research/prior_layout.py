"""The prior's memory layout, measured: channels-last (deft's) against contiguous NCHW, in one process.

On the CPU deft keeps the prior's convolution weights channels-last (:class:`deftcli.priors.UNetPrior`) and
applies GroupNorm's SiLU in place (:class:`deftcli.unet.GroupNormAct`). This script loads the shipped
prior twice, once as deft does and once with contiguous weights and SiLU out of place, and
times on the same inputs, interleaved over ``--rounds`` rounds after a warm-up round (medians):

- the prior's forward pass (inference mode) and its forward pass plus the backward pass w.r.t. the input
  (what a DPS step adds), batch ``--batch`` of 32×32 images;
- the whole samplers at N = ``--steps``: prior, DPS (ζ 10) and deft with the default h-network
  (random weights: the cost does not depend on them) on ``--batch`` measurements (4× super-resolution
  of petals val, σ_y 0.05).

Both layouts compute the same numbers (the largest difference of the scores is printed). Writes JSON::

    python benchmarks/research/prior_layout.py [--threads 2] [--batch 32] [--rounds 9] \\
        [--out benchmarks/research/results/prior_layout.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from deftcli import unet as unet_module
from deftcli.data import open_dataset
from deftcli.evaluate import interleaved_seconds_per_image
from deftcli.finetune import htransform_for
from deftcli.methods import DeftSampler, DPSSampler, PriorSampler, Sampler, SamplingSetup
from deftcli.operators import create
from deftcli.priors import Prior, load_prior
from deftcli.specs import DataSpec, FinetuneSpec
from deftcli.tuning import with_tuned_defaults

LAYOUTS = ("channels_last", "contiguous")


class OutOfPlaceGroupNormAct(unet_module.GroupNormAct):
    """GroupNormAct as it was: SiLU into a new tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.GroupNorm.forward(self, x.float()).to(x.dtype)
        return F.silu(y) if self.act else y


def as_before(prior: Prior) -> Prior:
    """The prior with contiguous weights and out-of-place SiLU (the layout before channels-last)."""
    # the UNet's own layout: UNetPrior.to would make it channels-last again
    prior.unet.to(memory_format=torch.contiguous_format)
    for module in prior.modules():
        if type(module) is unet_module.GroupNormAct:
            module.__class__ = OutOfPlaceGroupNormAct
    return prior


def interleaved_ms(
    calls: dict[str, Callable[[], object]], rounds: int, repeats: int = 3
) -> dict[str, dict[str, object]]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds + 1):
        for name, call in calls.items():
            began = time.perf_counter()
            for _ in range(repeats):
                call()
            if round_index:
                times[name].append((time.perf_counter() - began) / repeats * 1e3)
    return {
        name: {"median": round(statistics.median(t), 2), "all": [round(v, 2) for v in t]} for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/research/results/prior_layout.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    operator = create("superres", factor=4, sigma=0.05)
    priors = {"channels_last": load_prior(None), "contiguous": as_before(load_prior(None))}
    x = torch.randn(args.batch, *priors["contiguous"].image_shape)
    t = torch.full((args.batch,), 0.5)

    def forward(prior: Prior) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return prior.score(x, t)

        return call

    def forward_backward(prior: Prior) -> Callable[[], object]:
        def call() -> object:
            x_in = x.detach().requires_grad_(True)
            return torch.autograd.grad(prior.score(x_in, t).square().sum(), x_in)[0]

        return call

    with torch.inference_mode():
        difference = float((priors["channels_last"].score(x, t) - priors["contiguous"].score(x, t)).abs().max())
    passes = (("forward", forward), ("forward+input-backward", forward_backward))
    network = interleaved_ms(
        {f"{kind}, {layout}": make(priors[layout]) for layout in LAYOUTS for kind, make in passes}, args.rounds
    )

    samplers: dict[str, Sampler] = {}
    for layout in LAYOUTS:
        prior = priors[layout]
        setup = SamplingSetup(prior, args.steps)
        htransform = htransform_for(with_tuned_defaults(FinetuneSpec(), prior.tuning)[0], prior, operator).eval()
        samplers |= {
            f"prior, {layout}": PriorSampler(setup),
            f"dps, {layout}": DPSSampler(setup, operator, zeta=10.0),
            f"deft, {layout}": DeftSampler(setup, operator, htransform),
        }
    val = open_dataset(DataSpec(), "val", x.shape[-1], x.shape[1])
    y = operator.measure(val.batch(range(args.batch)), generator=torch.Generator().manual_seed(0))
    speed = interleaved_seconds_per_image(samplers, y, args.rounds)

    def median(name: str) -> float:
        return speed[name]["median"]

    summary = {
        layout: {
            "dps_over_deft": round(median(f"dps, {layout}") / median(f"deft, {layout}"), 3),
            "deft_over_prior": round(median(f"deft, {layout}") / median(f"prior, {layout}"), 3),
            "dps_over_prior": round(median(f"dps, {layout}") / median(f"prior, {layout}"), 3),
        }
        for layout in LAYOUTS
    }
    summary["speed-up of channels_last"] = {
        method: round(median(f"{method}, contiguous") / median(f"{method}, channels_last"), 3)
        for method in ("prior", "dps", "deft")
    }
    for name, row in network.items():
        print(f"{name:40s} {row['median']:8.2f} ms per batch of {args.batch}")
    for name, row in speed.items():
        print(f"{name:40s} {row['median']:.4f} s/sample")
    print(json.dumps(summary, indent=2))
    result = {
        "setup": {
            "prior": priors["contiguous"].name,
            "batch": args.batch,
            "steps": args.steps,
            "threads": args.threads,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "max_abs_score_difference": difference,
        "network_ms": network,
        "sampling_seconds_per_sample": speed,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
