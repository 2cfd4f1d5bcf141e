"""Posterior quality and speed on the embedded default: 4× super-resolution of petals val, σ_y = 0.05.

Every method a user would pick, in one process, on the same first ``--n`` val images, the same
measurements (seed 0), the same prior, time grid (the runs' N) and k samples per image: A†y, the
unconditional prior, DPS, DiffPIR, DDRM and deft. Nothing is chosen on val images: DPS's ζ and
DiffPIR's (λ, ζ) are selected by ``deft eval``'s sweep on the first train images, DDRM runs at the
paper's η = 0.85, η_b = 1, and for deft every run (``--run``, or one fine-tuned per ``--configs``
entry with the default ``deft finetune --operator superres --factor 4`` plus that entry's likelihood
weight w and h-network start) is swept on the same train images over the guidance scale γ and the
sampler (``sde``, or ``renoise`` at each ζ of ``--renoise-zetas``); the (run, γ, sampler) with the best
train PSNR is the selected deft, which ``--write-tuning`` stores as the prior's tuned defaults
(``tuning.json``). Reported: PSNR/SSIM of samples and posterior means, data residual, seconds per
image, the paired per-image difference of the selected deft's posterior-mean PSNR against each
baseline, every method on ``--prior-truth`` images drawn from the prior itself (where the model's
posterior is exact), and sampling speed (one batch per method, the methods interleaved over
``--speed-rounds`` rounds after a warm-up round, the median per method). Writes JSON and prints::

    python benchmarks/sample_quality.py [--run DIR --run DIR | --configs "1:gaussian,3:zero"]
        [--write-tuning model_weights/petals32/tuning.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime
from pathlib import Path

import torch
from common import (
    PRIOR_TRUTH,
    paired_difference,
    parse_with_evaluation_arguments,
    prior_truth_images,
    summarise,
    val_images,
)

from deftcli.evaluate import (
    SWEEP_IMAGES,
    interleaved_seconds_per_image,
    knob_candidates,
    per_image_metrics,
    sweep_on_train,
)
from deftcli.finetune import finetune
from deftcli.methods import SamplingSetup, build_sampler
from deftcli.runs import FinetunedRun, open_run
from deftcli.specs import EvalSpec, FinetuneSpec, build_spec


def finetune_run(args: argparse.Namespace, weight: float, start: str) -> tuple[Path, dict[str, object]]:
    """The default ``deft finetune --operator superres --factor 4`` with likelihood weight w and h-network start."""
    run_dir = (
        Path("benchmarks/results/runs")
        / f"sample_quality-{datetime.now().strftime('%Y%m%d-%H%M%S')}-w{weight:g}-{start}"
    )
    spec = build_spec(
        FinetuneSpec,
        overrides={
            "operator.name": "superres",
            "operator.params": {"factor": 4, "sigma": 0.05},
            "run_dir": str(run_dir),
            "device": "cpu",
            "likelihood_weight": weight,
            "hnet.start": start,
            **({"iterations": args.iterations} if args.iterations else {}),
        },
    )
    return run_dir, finetune(spec, quiet=True, command=["benchmarks/sample_quality.py"])


def run_name(run: FinetunedRun) -> str:
    """deft_w<w>_<start>: a run by what it was fine-tuned for."""
    start = "gaussian" if run.htransform.config.guidance is not None else "zero"
    return f"deft_w{run.htransform.config.likelihood_weight:g}_{start}"


def deft_candidates(gammas: list[float], zetas: list[float]) -> list[dict[str, object]]:
    """deft's sampling settings to sweep: each γ with the reverse SDE and with the renoise sampler at each ζ."""
    samplers = [{"sampler": "sde"}, *({"sampler": "renoise", "renoise_zeta": z} for z in zetas)]
    return [{"guidance_scale": g, **sampler} for sampler in samplers for g in gammas]


def finetune_seconds(run: FinetunedRun) -> float:
    """The training seconds of a run: the last line of its metrics log."""
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    return round(json.loads(lines[-1])["seconds"], 1)


def tuning_file(selected: dict[str, object], run: FinetunedRun, out: Path) -> dict[str, object]:
    """The prior's ``tuning.json`` for the selected deft (:mod:`deftcli.tuning`)."""
    config = run.htransform.config
    return {
        "selected_by": f"benchmarks/sample_quality.py: best PSNR on the first {SWEEP_IMAGES} petals train images, "
        f"4x super-resolution, sigma_y 0.05 (benchmarks/results/{out.name})",
        "operators": {
            run.operator.name: {
                "finetune": {
                    "likelihood_weight": config.likelihood_weight,
                    "iterations": run.spec.iterations,
                    "hnet_start": "gaussian" if config.guidance is not None else "zero",
                },
                "sampling": {
                    key: selected[key] for key in ("guidance_scale", "sampler", "renoise_zeta") if key in selected
                },
            }
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run",
        type=Path,
        action="append",
        help="an existing run of 4× super-resolution, repeatable (default: fine-tune --configs)",
    )
    parser.add_argument("--configs", default="1:gaussian,3:zero", help="runs to fine-tune, w:start comma-separated")
    parser.add_argument("--iterations", type=int, help="fine-tuning iterations (default: deft's default)")
    parser.add_argument(
        "--renoise-zetas", default="0.7,1.0", help="ζ values of deft's renoise sampler in its train sweep"
    )
    parser.add_argument(
        "--prior-truth",
        type=int,
        default=32,
        help="images drawn from the prior for the prior-is-exact comparison (0: skip)",
    )
    parser.add_argument("--speed-rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--write-tuning", type=Path, help="write the selected deft as the prior's tuning.json here")
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/results/sample_quality.json"))

    finetune_summaries: dict[str, object] = {}
    run_dirs = args.run or []
    if not run_dirs:
        for entry in args.configs.split(","):
            weight, start = entry.split(":")
            run_dir, summary = finetune_run(args, float(weight), start)
            finetune_summaries[run_dir.name] = summary
            run_dirs.append(run_dir)
    runs = {run_name(run): run for run in (open_run(d, torch.device("cpu")) for d in run_dirs)}
    base = next(iter(runs.values()))
    images, x = val_images(base, args.n)
    y = base.operator.measure(x, generator=torch.Generator().manual_seed(0))
    operator, image_shape = base.operator, base.prior.image_shape
    setup = SamplingSetup(base.prior, base.spec.time_steps, denoise_final=True)
    baselines = {
        method: build_sampler(method, setup, operator) for method in ("dagger", "prior", "dps", "diffpir", "ddrm")
    }
    sweep_spec = EvalSpec(batch_size=args.batch_size)
    cpu = torch.device("cpu")

    sweeps, configured = {}, {}
    for method in ("dps", "diffpir"):
        chosen, table = sweep_on_train(
            baselines[method],
            operator,
            image_shape,
            knob_candidates(sweep_spec, method)[0],
            base.spec.data,
            sweep_spec,
            cpu,
        )
        sweeps[method] = {"table": table, "selected": chosen}
        configured[method] = baselines[method].with_settings(**chosen)
        print(f"{method} sweep on train: {chosen}", flush=True)
    configured["ddrm"] = baselines["ddrm"]
    candidates = deft_candidates(sweep_spec.guidance_sweep, [float(z) for z in args.renoise_zetas.split(",")])
    best_train = {}
    for name, run in runs.items():
        deft = build_sampler("deft", setup, operator, run.htransform)
        chosen, table = sweep_on_train(deft, operator, image_shape, candidates, run.spec.data, sweep_spec, cpu)
        best_train[name] = max(row["psnr"] for row in table)
        sweeps[name] = {"table": table, "selected": chosen, "best_train_psnr": best_train[name]}
        configured[name] = deft.with_settings(**chosen)
        print(f"{name} sweep on train: {chosen} ({best_train[name]:.2f} dB)", flush=True)
    selected = max(best_train, key=best_train.get)

    methods, psnr_of_means, ssim_of_means = {}, {}, {}
    for name, sampler in {"dagger": baselines["dagger"], "prior": baselines["prior"], **configured}.items():
        k = 1 if sampler.deterministic else args.k
        per_image, _, seconds = per_image_metrics(sampler, operator, x, y, images, k, args.batch_size, seed=0)
        methods[name] = {**sampler.settings(), **summarise(per_image, seconds, len(images), k)}
        psnr_of_means[name], ssim_of_means[name] = per_image["psnr_mean"], per_image["ssim_mean"]
        print(
            f"{name:20s} PSNR sample {methods[name]['psnr_sample']:6.2f}  PSNR mean {methods[name]['psnr_mean']:6.2f}  "
            f"SSIM mean {methods[name]['ssim_mean']:.3f}  {methods[name]['seconds_per_image']:.2f} s/image",
            flush=True,
        )
    compared = ("dagger", "dps", "diffpir", "ddrm")
    against = {
        base_name: {
            "psnr_mean": paired_difference(psnr_of_means[selected], psnr_of_means[base_name]),
            "ssim_mean": paired_difference(ssim_of_means[selected], ssim_of_means[base_name]),
        }
        for base_name in compared
    }

    timed = {name: configured[name] for name in ("dps", "diffpir", "ddrm", selected)} | {"prior": baselines["prior"]}
    speed = interleaved_seconds_per_image(timed, y[: args.batch_size], args.speed_rounds)
    print(
        "seconds per image (median of interleaved rounds): "
        + ", ".join(f"{m} {v['median']:.3f}" for m, v in speed.items()),
        flush=True,
    )

    prior_truth = None
    if args.prior_truth:
        truth = prior_truth_images(base.prior, args.prior_truth)
        truth_y = operator.measure(truth, generator=torch.Generator().manual_seed(0))
        rows = {}
        for name, sampler in {"dagger": baselines["dagger"], **configured}.items():
            k = 1 if sampler.deterministic else args.k
            per_image, _, seconds = per_image_metrics(
                sampler, operator, truth, truth_y, list(range(args.prior_truth)), k, args.batch_size, seed=0
            )
            rows[name] = summarise(per_image, seconds, args.prior_truth, k)
            print(
                f"prior truth  {name:20s} PSNR mean {rows[name]['psnr_mean']:6.2f}  "
                f"SSIM mean {rows[name]['ssim_mean']:.3f}",
                flush=True,
            )
        prior_truth = {"images": f"{args.prior_truth} {PRIOR_TRUTH}", "methods": rows}

    top = {metric: max(compared[1:], key=lambda m: methods[m][metric]) for metric in ("psnr_mean", "ssim_mean")}
    result = {
        "setup": {
            "data": f"petals val, first {len(images)}",
            "operator": base.operator.describe(),
            "time_steps": base.spec.time_steps,
            "k": args.k,
            "runs": {name: str(run.path) for name, run in runs.items()},
            "threads": args.threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "finetune": {
            name: {"seconds": finetune_seconds(run), "iterations": run.spec.iterations} for name, run in runs.items()
        },
        "finetune_summaries": finetune_summaries or None,
        "sweeps": {"images": f"first {SWEEP_IMAGES} of train", **sweeps},
        "selected_deft": {"run": selected, **sweeps[selected]["selected"]},
        "methods": methods,
        "selected_deft_against": against,
        "sampling_speed": {
            "batch": min(args.batch_size, len(images)),
            "rounds": args.speed_rounds,
            "seconds_per_image": speed,
        },
        "prior_truth": prior_truth,
        "targets": {
            f"deft_{metric}_minus_best_baseline": {"baseline": top[metric], "difference": against[top[metric]][metric]}
            for metric in ("psnr_mean", "ssim_mean")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.write_tuning:
        args.write_tuning.write_text(
            json.dumps(tuning_file(sweeps[selected]["selected"], runs[selected], args.out), indent=2) + "\n"
        )
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
