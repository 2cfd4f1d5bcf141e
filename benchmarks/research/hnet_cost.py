"""Forward cost of candidate h-networks against the shipped prior's, on this CPU.

The h-network runs once per sampling step beside the prior, so its forward time decides how much
faster than DPS deft can sample. On a CPU the time of small-channel convolution layers follows their
activations, not their parameters, so a UNet on r×r pixel blocks (``space_to_depth`` r) costs about
r² less than the same UNet at full resolution. Random weights, batch ``--batch`` of 32×32 images,
median of ``--repeats`` timed calls after warm-up, in inference mode. Then the whole samplers at
N = ``--steps`` on ``--batch`` measurements (4× super-resolution of petals val, σ_y 0.05): the prior,
DPS (ζ 10) and deft with each candidate, interleaved over ``--rounds`` rounds after a warm-up round
(the cost does not depend on the weights). Writes JSON::

    python benchmarks/research/hnet_cost.py [--threads 2] [--batch 32] [--rounds 3] [--candidates 0,2] [--out …]
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

from deftcli.data import open_dataset
from deftcli.evaluate import interleaved_seconds_per_image
from deftcli.finetune import htransform_for
from deftcli.methods import DeftSampler, DPSSampler, PriorSampler, Sampler, SamplingSetup
from deftcli.operators import create
from deftcli.priors import load_prior
from deftcli.specs import DataSpec, FinetuneSpec
from deftcli.tuning import with_tuned_defaults

CANDIDATES = [
    {"model_channels": 8, "channel_mult": [1, 2], "space_to_depth": 1},
    {"model_channels": 4, "channel_mult": [1, 2], "space_to_depth": 1},
    {"model_channels": 8, "channel_mult": [1, 2], "space_to_depth": 2},
    {"model_channels": 16, "channel_mult": [1, 2], "space_to_depth": 2},
    {"model_channels": 8, "channel_mult": [1, 2, 2], "space_to_depth": 2},
    {"model_channels": 16, "channel_mult": [1, 2], "space_to_depth": 4},
    {"model_channels": 16, "channel_mult": [1], "space_to_depth": 4},
]


def milliseconds(call: Callable[[], object], repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            call()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=str, help="comma-separated indices into CANDIDATES (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/research/results/hnet_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior = load_prior(None)
    x = torch.randn(args.batch, *prior.image_shape)
    t = torch.full((args.batch,), 0.5)
    prior_ms = milliseconds(lambda: prior.score(x, t), args.repeats)
    prior_params = sum(p.numel() for p in prior.parameters())
    print(f"prior {prior.name}: {prior_ms:.1f} ms per batch of {args.batch}, {prior_params} parameters")
    rows, deft_samplers = [], {}
    setup = SamplingSetup(prior, args.steps)
    operator = create("superres", factor=4, sigma=0.05)
    chosen = [CANDIDATES[int(i)] for i in args.candidates.split(",")] if args.candidates else CANDIDATES
    for hnet in chosen:
        htransform = htransform_for(
            with_tuned_defaults(FinetuneSpec(hnet=hnet), prior.tuning)[0], prior, operator
        ).eval()
        ms = milliseconds(lambda: htransform(x, t, x), args.repeats)
        r = hnet["space_to_depth"]
        name = f"{hnet['model_channels']} ch {tuple(hnet['channel_mult'])}, {r}×{r} blocks"
        parameters = htransform.num_parameters()
        rows.append(
            {
                "name": name,
                **hnet,
                "ms": round(ms, 2),
                "fraction_of_prior_time": round(ms / prior_ms, 3),
                "parameters": parameters,
                "fraction_of_prior_parameters": round(parameters / prior_params, 3),
            }
        )
        deft_samplers[f"deft, {name}"] = DeftSampler(setup, operator, htransform)
        print(
            f"{name}: {ms:.1f} ms = {ms / prior_ms:.0%} of the prior's time, "
            f"{rows[-1]['fraction_of_prior_parameters']:.1%} of its parameters",
            flush=True,
        )
    samplers: dict[str, Sampler] = {
        "prior": PriorSampler(setup),
        "dps": DPSSampler(setup, operator, zeta=10.0),
        **deft_samplers,
    }
    val = open_dataset(DataSpec(), "val", prior.image_shape[-1], prior.image_shape[0])
    y = operator.measure(val.batch(range(args.batch)), generator=torch.Generator().manual_seed(0))
    speed = interleaved_seconds_per_image(samplers, y, args.rounds)
    dps = speed["dps"]["median"]
    for name, row in speed.items():
        row["dps_over_this"] = round(dps / row["median"], 2)
        row["over_prior"] = round(row["median"] / speed["prior"]["median"], 3)
        print(
            f"{name:40s} {row['median']:.4f} s/sample  DPS/this {row['dps_over_this']:.2f}  "
            f"this/prior {row['over_prior']:.3f}"
        )
    result = {
        "setup": {
            "prior": prior.name,
            "batch": args.batch,
            "threads": args.threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "prior_ms": round(prior_ms, 2),
        "prior_parameters": prior_params,
        "hnets": rows,
        "sampling": {"steps": args.steps, "rounds": args.rounds, "seconds_per_sample": speed},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
