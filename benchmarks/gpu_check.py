"""GPU smoke run and throughput at the original 64×64 configuration.

The original Flowers102 experiment's sizes, with random weights (cost does not depend on them):
a prior UNet of 64 ch, [1, 2, 4], one res block, no attention, max_period 0.005, on 64×64 RGB;
the original h-network (32 ch, [1, 2]); 4× super-resolution, σ_y = 0.05; batch 14 (one measurement
× 14 trajectories, as the original). For each N in ``--steps``:

- vargrad: seconds per fine-tuning iteration (one warm-up, then the mean of ``--iterations``) and
  the peak memory of the device (``torch.cuda.max_memory_allocated``, reset per N);
- sampling: samples per second of deft, DPS and the prior at the same N and batch ``--sample-batch``,
  measured in this one process, and their peak memory.

Also the embedded default's sampling cost on this device: the shipped
``petals32`` prior with an auto-sized h-network (random weights), 4× super-resolution, N = 50: samples
per second of deft, DPS and the prior, batch ``--sample-batch``.

Then a smoke run of the command line on the shipped prior and the embedded data: ``deft finetune``
(a few iterations, amortised; a random prior would only make the divergence guard skip every step,
so the smoke fails when any step is skipped) and ``deft eval`` (a few val images, all methods).
Temporary paths are written as ``<tmp>``.
Writes JSON (``--out``) and prints a table::

    python benchmarks/gpu_check.py --device cuda [--steps 50 200] [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import BATCH, FACTOR, ORIGINAL_HNET, ORIGINAL_PRIOR, SIGMA_Y, SIZE, synchronize, write_random_prior

from deftcli.finetune import Finetuner, htransform_for
from deftcli.htransform import HTransform
from deftcli.images import save_image
from deftcli.methods import SamplingSetup, build_sampler
from deftcli.operators import Operator, create
from deftcli.priors import load_prior
from deftcli.samplers import GeneratorNoise
from deftcli.specs import FinetuneSpec
from deftcli.tuning import with_tuned_defaults


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds of fn over repeats, after one warm-up call."""
    fn()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - began) / repeats


def sampling_speed(
    setup: SamplingSetup,
    operator: Operator,
    htransform: HTransform,
    y: torch.Tensor,
    repeats: int,
    device: torch.device,
) -> dict[str, float | None]:
    """Samples per second and peak memory of deft, DPS and the prior on the same measurements."""
    noise = GeneratorNoise(torch.Generator(device).manual_seed(0))
    row: dict[str, float | None] = {}
    for method in ("deft", "dps", "prior"):
        reset_peak(device)
        sampler = build_sampler(method, setup, operator, htransform)

        def draw() -> torch.Tensor:
            with torch.no_grad():
                return sampler.sample(y, noise)

        row[f"{method}_samples_per_second"] = round(y.shape[0] / timed(draw, device, repeats), 2)
        row[f"{method}_peak_memory_mb"] = peak_mb(device)
    row["dps_seconds_over_deft_seconds"] = round(row["deft_samples_per_second"] / row["dps_samples_per_second"], 3)
    return row


def shipped_prior_sampling(args: argparse.Namespace, device: torch.device) -> dict:
    spec = FinetuneSpec.model_validate(
        {"operator": {"name": "superres", "params": {"factor": FACTOR, "sigma": SIGMA_Y}}}
    )
    prior = load_prior("petals32").to(device)
    operator = create("superres", factor=FACTOR, sigma=SIGMA_Y).to(device)
    htransform = (
        htransform_for(with_tuned_defaults(spec, prior.tuning)[0], prior, operator)
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    size = prior.image_shape[-1]
    y = operator.measure(torch.rand(args.sample_batch, 3, size, size, device=device) * 2 - 1)
    return {
        "prior": "petals32",
        "time_steps": 50,
        **sampling_speed(SamplingSetup(prior, 50), operator, htransform, y, args.sample_repeats, device),
    }


def finetune_and_sample(tmp: Path, steps: int, args: argparse.Namespace, device: torch.device) -> dict:
    run_dir = tmp / f"run-N{steps}"
    run_dir.mkdir()
    spec = FinetuneSpec.model_validate(
        {
            "prior": {"path": str(tmp / "prior")},
            "operator": {"name": "superres", "params": {"factor": FACTOR, "sigma": SIGMA_Y}},
            "measurement": str(tmp / "y.safetensors"),
            "method": "vargrad",
            "time_steps": steps,
            "trajectories": BATCH,
            "iterations": 1000,
            "loss_threshold": 1e12,
            "hnet": ORIGINAL_HNET,
            "device": str(device),
            "run_dir": str(run_dir),
        }
    )
    reset_peak(device)
    trainer = Finetuner(spec, run_dir, resume=False, quiet=True)
    seconds_per_iteration = timed(trainer.step, device, args.iterations)
    row = {
        "time_steps": steps,
        "vargrad_seconds_per_iteration": round(seconds_per_iteration, 4),
        "vargrad_peak_memory_mb": peak_mb(device),
    }

    htransform = trainer.htransform.eval().requires_grad_(False)
    y = trainer.operator.measure(torch.rand(args.sample_batch, 3, SIZE, SIZE, device=device) * 2 - 1)
    row.update(
        sampling_speed(
            SamplingSetup(trainer.prior, steps), trainer.operator, htransform, y, args.sample_repeats, device
        )
    )
    return row


def cli_smoke(tmp: Path, device: torch.device) -> dict:
    """`deft finetune` and `deft eval` through the command line on the shipped prior; passed when both
    exit 0, no fine-tuning step was skipped and the table has every method."""
    run = tmp / "cli-run"
    commands = [
        [
            "finetune",
            "--operator",
            "superres",
            "--factor",
            str(FACTOR),
            "--sigma",
            str(SIGMA_Y),
            "--iterations",
            "5",
            "--time-steps",
            "20",
            "--device",
            str(device),
            "--run-dir",
            str(run),
            "--quiet",
        ],
        [
            "eval",
            "--run",
            str(run),
            "--split",
            "val",
            "--n",
            "4",
            "-k",
            "2",
            "--steps",
            "20",
            "--device",
            str(device),
            "-o",
            str(tmp / "eval"),
        ],
    ]
    results = []
    for command in commands:
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "deftcli", *command], capture_output=True, text=True)
        results.append(
            {
                "command": "deft " + " ".join(command).replace(str(tmp), "<tmp>"),
                "exit_code": done.returncode,
                "seconds": round(time.perf_counter() - began, 1),
                "output_tail": (done.stdout + done.stderr)[-1500:].replace(str(tmp), "<tmp>"),
            }
        )
        print(f"deft {command[0]}: exit {done.returncode} in {results[-1]['seconds']} s", flush=True)
    metrics = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").exists()
        else []
    )
    table = (
        json.loads((tmp / "eval" / "results.json").read_text())["methods"]
        if (tmp / "eval" / "results.json").exists()
        else {}
    )
    skipped = sum(1 for row in metrics if row.get("skipped"))
    passed = (
        all(r["exit_code"] == 0 for r in results)
        and len(metrics) == 5
        and not skipped
        and set(table) == {"deft", "dps", "prior", "dagger"}
    )
    print(
        f"CLI smoke {'passed' if passed else 'FAILED'}: {len(metrics)} fine-tuning steps logged, {skipped} skipped",
        flush=True,
    )
    return {
        "passed": passed,
        "finetune_steps_logged": len(metrics),
        "finetune_steps_skipped": skipped,
        "eval_psnr_mean": {name: round(row["psnr_mean"], 2) for name, row in table.items()},
        "commands": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--sample-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {card}, torch {torch.__version__}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_prior(tmp / "prior")
        save_image(torch.zeros(3, SIZE // FACTOR, SIZE // FACTOR), tmp / "y.safetensors")
        for steps in args.steps:
            rows.append(finetune_and_sample(tmp, steps, args, device))
            r = rows[-1]
            print(
                f"N={steps:4d}  vargrad {r['vargrad_seconds_per_iteration']:.3f} s/it, "
                f"peak {r['vargrad_peak_memory_mb']} MB;  samples/s: "
                f"deft {r['deft_samples_per_second']}, DPS {r['dps_samples_per_second']}, "
                f"prior {r['prior_samples_per_second']}",
                flush=True,
            )
        shipped = shipped_prior_sampling(args, device)
        print(
            "petals32 N=50 samples/s: "
            f"deft {shipped['deft_samples_per_second']}, DPS {shipped['dps_samples_per_second']}, "
            f"prior {shipped['prior_samples_per_second']}",
            flush=True,
        )
        smoke = cli_smoke(tmp, device)
    result = {
        "card": card,
        "torch": torch.__version__,
        "config": {
            "image_size": SIZE,
            "batch": BATCH,
            "prior": ORIGINAL_PRIOR,
            "hnet": ORIGINAL_HNET,
            "operator": f"superres factor {FACTOR}, sigma {SIGMA_Y}",
            "sample_batch": args.sample_batch,
            "iterations_timed": args.iterations,
        },
        "rows": rows,
        "shipped_prior_sampling": shipped,
        "cli_smoke": smoke,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
