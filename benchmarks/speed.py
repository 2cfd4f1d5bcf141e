"""Speed of the networks' precision (fp32, bf16) and graph mode (eager, compiled), in one process.

For each of {fp32, bf16} × {eager, compiled} (:class:`deftcli.devices.Runtime`), on the CPU with the
embedded default (the shipped prior ``petals32``, the default h-network with random weights — the
cost does not depend on them —, 4× super-resolution, σ_y 0.05):

- the prior's forward pass, images per second at batch ``--batch`` (no autograd);
- deft and DPS (ζ 10), seconds per sample at batch ``--batch`` and N = ``--steps``;
- vargrad, seconds per fine-tuning iteration at N = ``--steps`` (the default amortised batch, M = 2 × K = 4).

Round 0 is the warm-up: its time (which holds every compilation) is reported as ``first_call_seconds``
(with a fresh inductor cache, ``TORCHINDUCTOR_CACHE_DIR``, it is a cold compilation);
then ``--rounds`` timed rounds interleave the four configurations (medians). The CPU's features
(:func:`deftcli.devices.cpu_features`) are named in the JSON, and every figure is quoted as a ratio
to fp32 eager from the same run. Where CUDA is available, the same at the original 64×64
configuration of ``gpu_check.py`` (random prior of 64 ch [1, 2, 4], h-network 32 ch [1, 2], one
measurement × 14 trajectories), with a fifth configuration: bf16, compiled, channels-last.
``--compiled-parts`` limits what the compiled configurations time (each part compiles its own graphs,
minutes each on a small busy CPU); the others are reported as ``null``. Writes JSON::

    python benchmarks/speed.py [--threads 1] [--rounds 2] [--compiled-parts prior_forward deft dps vargrad]
                               [--out benchmarks/results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import BATCH, FACTOR, ORIGINAL_HNET, SIGMA_Y, SIZE, synchronize, write_random_prior

from deftcli.data import open_dataset
from deftcli.devices import Runtime, cpu_features
from deftcli.finetune import Finetuner, htransform_for
from deftcli.images import save_image
from deftcli.methods import DeftSampler, DPSSampler, SamplingSetup
from deftcli.operators import create
from deftcli.priors import load_prior
from deftcli.samplers import GeneratorNoise
from deftcli.specs import DataSpec, FinetuneSpec
from deftcli.tuning import with_tuned_defaults

CONFIGS = {
    "fp32, eager": ("fp32", False, False),
    "fp32, compiled": ("fp32", True, False),
    "bf16, eager": ("bf16", False, False),
    "bf16, compiled": ("bf16", True, False),
}
CUDA_CONFIGS = {**CONFIGS, "bf16, compiled, channels-last": ("bf16", True, True)}
PARTS = ("prior_forward", "deft", "dps", "vargrad")


@dataclass
class Problem:
    """What every configuration runs on: the prior, the fine-tuning spec and the measurements."""

    prior: str | None
    finetune: dict
    y: torch.Tensor


def build(
    problem: Problem, device: torch.device, precision: str, compiled: bool, channels_last: bool, run_dir: Path
) -> tuple[dict[str, Callable[[], object]], Finetuner]:
    """One configuration's timed calls (prior forward, deft and DPS sampling, a vargrad iteration) and its trainer."""
    run_dir.mkdir(parents=True)
    operator = create("superres", factor=FACTOR, sigma=SIGMA_Y).to(device)
    spec = FinetuneSpec.model_validate(
        {
            **problem.finetune,
            "precision": precision,
            "compile": compiled,
            "device": str(device),
            "run_dir": str(run_dir),
        }
    )
    prior = load_prior(problem.prior).to(device)
    torch.manual_seed(0)
    htransform = (
        htransform_for(with_tuned_defaults(spec, prior.tuning)[0], prior, operator)
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    trainer = Finetuner(spec, run_dir, resume=False, quiet=True)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    if channels_last:
        for module in (prior.unet, htransform, trainer.prior.unet, trainer.htransform):
            module.to(memory_format=torch.channels_last)
    Runtime(device, precision, compiled).adapt(prior, htransform)
    setup = SamplingSetup(prior, spec.time_steps)
    deft, dps = DeftSampler(setup, operator, htransform), DPSSampler(setup, operator, zeta=10.0)
    y = problem.y.to(device)
    x = torch.randn(y.shape[0], *prior.image_shape, device=device).contiguous(memory_format=memory_format)
    t = torch.full((y.shape[0],), 0.5, device=device)
    noise = GeneratorNoise(torch.Generator(device).manual_seed(0))

    def forward() -> object:
        with torch.no_grad():
            return prior.score(x, t)

    calls = {
        "prior_forward": forward,
        "deft": lambda: deft.sample(y, noise),
        "dps": lambda: dps.sample(y, noise),
        "vargrad": trainer.step,
    }
    return calls, trainer


def measure(
    problem: Problem,
    device: torch.device,
    configs: dict[str, tuple[str, bool, bool]],
    rounds: int,
    tmp: Path,
    compiled_parts: tuple[str, ...] = PARTS,
) -> dict:
    """First-call and median steady-state seconds of every call of every configuration, interleaved."""
    built = {name: build(problem, device, *config, tmp / name.replace(", ", "-")) for name, config in configs.items()}
    calls = {
        name: {key: call for key, call in b[0].items() if not configs[name][1] or key in compiled_parts}
        for name, b in built.items()
    }
    trainers = {name: b[1] for name, b in built.items()}
    first: dict[str, dict[str, float]] = {name: {} for name in calls}
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key in c} for name, c in calls.items()}
    for round_index in range(rounds + 1):
        for key in PARTS:
            for name, c in ((name, c) for name, c in calls.items() if key in c):
                synchronize(device)
                began = time.perf_counter()
                c[key]()
                synchronize(device)
                seconds = time.perf_counter() - began
                if round_index:
                    times[name][key].append(seconds)
                else:
                    first[name][key] = round(seconds, 3)
                print(f"round {round_index} {name:32s} {key:14s} {seconds:8.3f} s", flush=True)
    batch = problem.y.shape[0]
    rows = {}
    for name in calls:
        median = {key: statistics.median(times[name][key]) if times[name].get(key) else None for key in PARTS}

        def per(key: str, scale: float, digits: int) -> float | None:
            return None if median[key] is None else round(median[key] * scale, digits)

        rows[name] = {
            "prior_forward_images_per_second": ratio(batch, median["prior_forward"], 1),
            "deft_seconds_per_sample": per("deft", 1 / batch, 4),
            "dps_seconds_per_sample": per("dps", 1 / batch, 4),
            "vargrad_seconds_per_iteration": per("vargrad", 1, 3),
            "vargrad_skipped_steps": trainers[name].skipped_total,
            "first_call_seconds": first[name],
            "all_seconds": {key: [round(s, 3) for s in v] for key, v in times[name].items()},
        }
    reference = rows["fp32, eager"]
    timed = ("deft_seconds_per_sample", "dps_seconds_per_sample", "vargrad_seconds_per_iteration")
    throughput = "prior_forward_images_per_second"
    ratios = {
        name: {
            "prior_forward_speedup": ratio(row[throughput], reference[throughput]),
            **{f"{key}_speedup": ratio(reference[key], row[key]) for key in timed},
        }
        for name, row in rows.items()
    }
    return {"rows": rows, "speedup_over_fp32_eager": ratios}


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    return None if numerator is None or denominator is None else round(numerator / denominator, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compiled-parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    operator = create("superres", factor=FACTOR, sigma=SIGMA_Y)
    val = open_dataset(DataSpec(), "val", 32, 3).batch(range(args.batch))
    result = {
        "setup": {
            "batch": args.batch,
            "time_steps": args.steps,
            "threads": args.threads,
            "rounds": args.rounds,
            "compiled_parts": args.compiled_parts,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu": cpu_features().describe(),
            "problem": f"petals32, default h-network (random weights), superres factor {FACTOR}, "
            f"sigma {SIGMA_Y}, DPS zeta 10",
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        superres = {"name": "superres", "params": {"factor": FACTOR, "sigma": SIGMA_Y}}
        y = operator.measure(val, generator=torch.Generator().manual_seed(0))
        cpu = Problem(None, {"operator": superres, "time_steps": args.steps}, y)
        result["cpu"] = measure(cpu, torch.device("cpu"), CONFIGS, args.rounds, tmp / "cpu", tuple(args.compiled_parts))
        if torch.cuda.is_available():
            device = torch.device("cuda")
            write_random_prior(tmp / "prior")
            save_image(torch.zeros(3, SIZE // FACTOR, SIZE // FACTOR), tmp / "y.safetensors")
            cuda = Problem(
                str(tmp / "prior"),
                {
                    "operator": superres,
                    "measurement": str(tmp / "y.safetensors"),
                    "time_steps": args.steps,
                    "trajectories": BATCH,
                    "loss_threshold": 1e12,
                    "hnet": ORIGINAL_HNET,
                },
                operator.measure(torch.rand(args.batch, 3, SIZE, SIZE) * 2 - 1),
            )
            measured = measure(cuda, device, CUDA_CONFIGS, args.rounds, tmp / "cuda", tuple(args.compiled_parts))
            result["cuda"] = {"card": torch.cuda.get_device_name(device), **measured}
    speedups = {part: result[part]["speedup_over_fp32_eager"] for part in ("cpu", "cuda") if part in result}
    print(json.dumps(speedups, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
