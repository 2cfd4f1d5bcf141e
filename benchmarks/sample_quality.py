"""Posterior quality and speed on the embedded default: 4× super-resolution of petals val, σ_y = 0.05.

Runs the default fine-tuning (``deft finetune --operator superres --factor 4``, with snapshots of
the h-network every ``--snapshot-every`` steps) unless ``--run`` names a finished run, then, on the
first ``--n`` val images with measurements drawn once (seed 0), evaluates in this one process:
A†y, the unconditional prior, DPS (ζ chosen by a sweep on train images), deft (γ = 1, the
fine-tuned posterior) and deft at the guidance scale γ that the same sweep selects, each with k
samples per image at the run's number of time steps; and deft's PSNR (at both γ) for every
snapshot, against the fine-tuning minutes it had. A second, smaller comparison (``--prior-truth`` images) replaces
the val images by samples of the prior itself: there the prior is exact, which separates what the
prior's mismatch with petals costs each method from how close each sampler is to the posterior.
Sampling speed is measured separately, so that no method pays for another's warm-up: one batch of
``--batch-size`` measurements per method, the methods interleaved over ``--speed-rounds`` rounds
after a warm-up round, the median per method. Writes JSON and prints a table::

    python benchmarks/sample_quality.py [--run runs/superres-…] [--iterations 400 --snapshot-every 50] [--hnet-start gaussian] [--n 64] [-k 4]
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch

from deftcli.data import open_dataset
from deftcli.evaluate import SWEEP_IMAGES, interleaved_seconds_per_image, per_image_metrics, sweep_on_train
from deftcli.finetune import finetune
from deftcli.htransform import load_htransform
from deftcli.methods import Reconstructor
from deftcli.runs import open_run
from deftcli.specs import EvalSpec, FinetuneSpec, build_spec


def summarise(per_image: dict[str, torch.Tensor], seconds: float, n: int, k: int) -> dict[str, float]:
    return {**{key: round(float(v.mean()), 4) for key, v in per_image.items()}, "seconds_per_image": round(seconds / n, 3), "k": k}


def prior_truth_comparison(rec: Reconstructor, gamma: float, n: int, k: int, batch_size: int, zetas: list[float]) -> dict[str, object]:
    """deft (γ = 1 and ``gamma``) and DPS (at each ζ of ``zetas``) on n ground-truth images drawn from the prior (200-step reverse SDE, seed 123)."""
    truth_rec = Reconstructor(rec.prior, rec.operator, None, 200, denoise_final=True)
    x = truth_rec.unconditional(n, torch.device("cpu"), torch.Generator().manual_seed(123)).clamp(-1, 1)
    y = rec.operator.measure(x, generator=torch.Generator().manual_seed(0))
    images, rows = list(range(n)), {}
    runs = [("dagger", "dagger", rec, 1), ("deft", "deft", rec, k), (f"deft_gamma_{gamma:g}", "deft", replace(rec, guidance_scale=gamma), k), *((f"dps_zeta_{z:g}", "dps", replace(rec, dps_zeta=z), k) for z in zetas)]
    for name, method, method_rec, samples in runs:
        per_image, _, seconds = per_image_metrics(method_rec, method, x, y, images, samples, batch_size, seed=0)
        rows[name] = summarise(per_image, seconds, n, samples)
        print(f"prior truth  {name:13s} PSNR mean {rows[name]['psnr_mean']:6.2f}  residual {rows[name]['data_residual']:.3f}", flush=True)
    return {"images": f"{n} samples of the prior (200 steps, seed 123), clamped to [-1, 1]", "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing run of 4× super-resolution (default: fine-tune one now)")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--iterations", type=int, help="fine-tuning iterations (default: deft's default); a longer run shows when deft passes DPS")
    parser.add_argument("--snapshot-every", type=int, default=20)
    parser.add_argument("--hnet-start", choices=["zero", "gaussian"], help="the h-network's start (default: deft's default)")
    parser.add_argument("--prior-truth", type=int, default=32, help="images drawn from the prior for the prior-is-exact comparison (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--speed-rounds", type=int, default=9, help="interleaved timed rounds (3 left ±7–10 %% noise on the ratio)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sample_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run_dir = args.run
    finetune_summary = None
    if run_dir is None:
        run_dir = Path("benchmarks/results/runs") / f"sample_quality-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        spec = build_spec(FinetuneSpec, overrides={"operator.name": "superres", "operator.params": {"factor": 4, "sigma": 0.05},
                                                   "snapshot_every": args.snapshot_every, "run_dir": str(run_dir), "device": "cpu",
                                                   **({"iterations": args.iterations} if args.iterations else {}),
                                                   **({"hnet.start": args.hnet_start} if args.hnet_start else {})})
        finetune_summary = finetune(spec, quiet=True, command=["benchmarks/sample_quality.py"])
    run = open_run(run_dir, torch.device("cpu"))
    data = open_dataset(run.spec.data, "val", run.prior.image_shape[-1], run.prior.image_shape[0])
    images = list(range(min(args.n, len(data))))
    x = data.batch(images)
    y = run.operator.measure(x, generator=torch.Generator().manual_seed(0))
    steps = run.spec.time_steps
    rec = Reconstructor(run.prior, run.operator, run.htransform, steps, denoise_final=True)
    sweep_spec = EvalSpec(batch_size=args.batch_size)
    zeta, sweep = sweep_on_train(rec, "dps", sweep_spec.dps_sweep, run, sweep_spec, torch.device("cpu"))
    gamma, gamma_sweep = sweep_on_train(rec, "deft", sweep_spec.guidance_sweep, run, sweep_spec, torch.device("cpu"))
    rec = replace(rec, dps_zeta=zeta)
    guided = replace(rec, guidance_scale=gamma)

    methods = {}
    for name, method, method_rec in (("dagger", "dagger", rec), ("prior", "prior", rec), ("dps", "dps", rec), ("deft", "deft", rec),
                                     ("deft_guided", "deft", guided)):
        k = 1 if method == "dagger" else args.k
        per_image, _, seconds = per_image_metrics(method_rec, method, x, y, images, k, args.batch_size, seed=0)
        methods[name] = {**method_rec.settings(method), **summarise(per_image, seconds, len(images), k)}
        print(f"{name:11s} PSNR sample {methods[name]['psnr_sample']:6.2f}  PSNR mean {methods[name]['psnr_mean']:6.2f}  "
              f"SSIM mean {methods[name]['ssim_mean']:.3f}  {methods[name]['seconds_per_image']:.2f} s/image", flush=True)

    speed = interleaved_seconds_per_image({m: (rec, m) for m in ("deft", "dps", "prior")}, y[: args.batch_size], args.speed_rounds)
    print("seconds per image (median of interleaved rounds): " + ", ".join(f"{m} {v['median']:.3f}" for m, v in speed.items()), flush=True)

    neighbours = sorted(z for z in EvalSpec().dps_sweep if zeta / 3.5 <= z <= zeta * 3.5)
    prior_truth = prior_truth_comparison(rec, gamma, args.prior_truth, args.k, args.batch_size, neighbours) if args.prior_truth else None

    curve = []
    for path in sorted((run_dir / "snapshots").glob("hnet_step_*.safetensors")):
        htransform, meta = load_htransform(path, run.prior)
        row = {"step": meta["step"], "finetune_minutes": round(meta["seconds"] / 60, 2)}
        for key, scale in (("deft", 1.0), ("deft_guided", gamma)):
            snap = Reconstructor(run.prior, run.operator, htransform.eval(), steps, denoise_final=True, guidance_scale=scale)
            per_image, _, seconds = per_image_metrics(snap, "deft", x, y, images, args.k, args.batch_size, seed=0)
            row[key] = {"guidance_scale": scale, **summarise(per_image, seconds, len(images), args.k)}
        curve.append(row)
        print(f"snapshot step {row['step']:4d} ({row['finetune_minutes']:5.2f} min)  PSNR mean {row['deft']['psnr_mean']:6.2f}, "
              f"γ = {gamma:g}: {row['deft_guided']['psnr_mean']:6.2f}", flush=True)

    def minutes_to_pass_dps(key: str) -> float | None:
        passed = [row for row in curve if row[key]["psnr_mean"] > methods["dps"]["psnr_mean"]]
        return passed[0]["finetune_minutes"] if passed else None
    result = {
        "setup": {"data": f"petals val, first {len(images)}", "operator": run.operator.describe(), "time_steps": steps, "k": args.k,
                  "run": str(run_dir), "threads": args.threads, "torch": torch.__version__, "platform": platform.platform()},
        "finetune": finetune_summary,
        "dps_sweep": {"images": f"first {SWEEP_IMAGES} of train", "table": sweep, "selected": zeta},
        "guidance_sweep": {"images": f"first {SWEEP_IMAGES} of train", "table": gamma_sweep, "selected": gamma},
        "methods": methods,
        "sampling_speed": {"batch": min(args.batch_size, len(images)), "rounds": args.speed_rounds, "seconds_per_image": speed},
        "curve": curve,
        "prior_truth": prior_truth,
        "targets": {
            "deft_mean_psnr_above_dps": methods["deft"]["psnr_mean"] > methods["dps"]["psnr_mean"],
            "deft_mean_psnr_above_dagger": methods["deft"]["psnr_mean"] > methods["dagger"]["psnr_mean"],
            "deft_guided_mean_psnr_above_dps": methods["deft_guided"]["psnr_mean"] > methods["dps"]["psnr_mean"],
            "dps_over_deft_seconds_per_image": round(speed["dps"]["median"] / speed["deft"]["median"], 2),
            "finetune_minutes_to_pass_dps": minutes_to_pass_dps("deft"),
            "finetune_minutes_to_pass_dps_guided": minutes_to_pass_dps("deft_guided"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
