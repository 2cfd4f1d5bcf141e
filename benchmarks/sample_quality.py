"""Posterior quality and speed on the embedded default: 4× super-resolution of petals val, σ_y = 0.05.

Fine-tunes one run per likelihood weight w of ``--likelihood-weights`` (``deft finetune --operator
superres --factor 4 --likelihood-weight w``: w = 1 is the default command, the posterior; w > 1 the
tempered posterior p(x) p(y | x)^w, at the default lr 5e-4 / w; snapshots of the h-network every
``--snapshot-every`` steps) unless ``--run`` names finished runs, then, on the first ``--n`` val
images with measurements drawn once (seed 0), evaluates in this one process: A†y, the unconditional
prior, DPS (ζ chosen by a sweep on train images), and for each run deft at γ = 1 (the fine-tuned
posterior, or tempered posterior) and at the guidance scale γ that the same sweep selects for it,
each with k samples per image at the run's number of time steps. The pair (w, γ) with the best
train PSNR is the benchmark's selected deft; nothing is read off the val images. Also deft's PSNR
for every snapshot of each run, against the fine-tuning minutes it had. A second, smaller comparison
(``--prior-truth`` images) replaces the val images by samples of the prior itself: there the prior
is exact, which separates what the prior's mismatch with petals costs each method from how close
each sampler is to the posterior. Sampling speed is measured separately (w does not change the
cost), so that no method pays for another's warm-up: one batch of ``--batch-size`` measurements per
method, the methods interleaved over ``--speed-rounds`` rounds after a warm-up round, the median per
method. Writes JSON and prints a table::

    python benchmarks/sample_quality.py [--run runs/superres-… --run …] [--likelihood-weights 1,3] [--iterations 400 --snapshot-every 50] [--hnet-start gaussian] [--n 64] [-k 4]
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
from deftcli.runs import FinetunedRun, open_run
from deftcli.specs import EvalSpec, FinetuneSpec, build_spec


def summarise(per_image: dict[str, torch.Tensor], seconds: float, n: int, k: int) -> dict[str, float]:
    return {**{key: round(float(v.mean()), 4) for key, v in per_image.items()}, "seconds_per_image": round(seconds / n, 3), "k": k}


PRIOR_TRUTH = "samples of the prior (200 steps, seed 123), clamped to [-1, 1]"


def prior_truth_images(rec: Reconstructor, n: int) -> torch.Tensor:
    """n ground-truth images drawn from the prior itself (:data:`PRIOR_TRUTH`): there its posterior is the true one."""
    truth_rec = Reconstructor(rec.prior, rec.operator, None, 200, denoise_final=True)
    return truth_rec.unconditional(n, torch.device("cpu"), torch.Generator().manual_seed(123)).clamp(-1, 1)


def prior_truth_comparison(rec: Reconstructor, deft_configs: dict[str, Reconstructor], n: int, k: int, batch_size: int, zetas: list[float]) -> dict[str, object]:
    """Every deft configuration and DPS (at each ζ of ``zetas``) on n ground-truth images drawn from the prior."""
    x = prior_truth_images(rec, n)
    y = rec.operator.measure(x, generator=torch.Generator().manual_seed(0))
    images, rows = list(range(n)), {}
    runs = [("dagger", "dagger", rec, 1), *((name, "deft", deft_rec, k) for name, deft_rec in deft_configs.items()),
            *((f"dps_zeta_{z:g}", "dps", replace(rec, dps_zeta=z), k) for z in zetas)]
    for name, method, method_rec, samples in runs:
        per_image, _, seconds = per_image_metrics(method_rec, method, x, y, images, samples, batch_size, seed=0)
        rows[name] = {**method_rec.settings(method), **summarise(per_image, seconds, n, samples)}
        print(f"prior truth  {name:16s} PSNR mean {rows[name]['psnr_mean']:6.2f}  residual {rows[name]['data_residual']:.3f}", flush=True)
    return {"images": f"{n} {PRIOR_TRUTH}", "methods": rows}


def parse_with_evaluation_arguments(parser: argparse.ArgumentParser, out: Path, n: int = 64, k: int = 4
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


def deft_against_dps(args: argparse.Namespace) -> tuple[FinetunedRun, list[int], torch.Tensor, dict[str, Reconstructor]]:
    """The run of ``--run``, the benchmark's val images (indices, pixels) and the two samplers: deft at
    ``--guidance-scale`` and DPS at ``--dps-zeta``, at the run's N with the Tweedie-denoised last step."""
    run = open_run(args.run, torch.device("cpu"))
    images, x = val_images(run, args.n)
    rec = Reconstructor(run.prior, run.operator, run.htransform, run.spec.time_steps, denoise_final=True)
    return run, images, x, {"deft": replace(rec, guidance_scale=args.guidance_scale), "dps": replace(rec, dps_zeta=args.dps_zeta)}


def deft_against_dps_row(methods: dict[str, Reconstructor], x: torch.Tensor, y: torch.Tensor, images: list[int], args: argparse.Namespace, seed: int) -> dict[str, object]:
    """deft's and DPS's k samples per image for measurements y of truths x (sampler seed ``seed``): each
    method's summary and the paired per-image difference of their posterior-mean PSNR, deft − DPS."""
    per_method = {name: per_image_metrics(method_rec, name, x, y, images, args.k, args.batch_size, seed=seed) for name, method_rec in methods.items()}
    return {**{name: summarise(per_image, seconds, len(images), args.k) for name, (per_image, _, seconds) in per_method.items()},
            "deft_minus_dps": paired_difference(per_method["deft"][0]["psnr_mean"], per_method["dps"][0]["psnr_mean"])}


def describe_gap(row: dict[str, object]) -> str:
    """One line for a :func:`deft_against_dps_row`."""
    gap = row["deft_minus_dps"]
    return (f"PSNR mean deft {row['deft']['psnr_mean']:.3f}, DPS {row['dps']['psnr_mean']:.3f}; deft − DPS {gap['mean_db']:+.3f} "
            f"± {gap['standard_error_db']:.3f} dB, above on {gap['images_above']} of {gap['images']}")


def val_images(run: FinetunedRun, n: int) -> tuple[list[int], torch.Tensor]:
    """The benchmark's images: the indices and pixels of the first n images of the run's val split."""
    data = open_dataset(run.spec.data, "val", run.prior.image_shape[-1], run.prior.image_shape[0])
    images = list(range(min(n, len(data))))
    return images, data.batch(images)


def paired_difference(psnr: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per-image posterior-mean PSNR minus the reference's on the same images: mean, its standard error, and the images above."""
    difference = psnr - reference
    return {"mean_db": round(float(difference.mean()), 4), "standard_error_db": round(float(difference.std() / difference.numel() ** 0.5), 4),
            "images_above": int((difference > 0).sum()), "images": difference.numel()}


def finetune_run(args: argparse.Namespace, weight: float) -> tuple[Path, dict[str, object]]:
    """The default ``deft finetune --operator superres --factor 4`` with likelihood weight w (and its default lr, 5e-4 / w)."""
    run_dir = Path("benchmarks/results/runs") / f"sample_quality-{datetime.now().strftime('%Y%m%d-%H%M%S')}-w{weight:g}"
    spec = build_spec(FinetuneSpec, overrides={"operator.name": "superres", "operator.params": {"factor": 4, "sigma": 0.05},
                                               "snapshot_every": args.snapshot_every, "run_dir": str(run_dir), "device": "cpu",
                                               "likelihood_weight": weight,
                                               **({"iterations": args.iterations} if args.iterations else {}),
                                               **({"hnet.start": args.hnet_start} if args.hnet_start else {})})
    return run_dir, finetune(spec, quiet=True, command=["benchmarks/sample_quality.py"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", help="an existing run of 4× super-resolution, repeatable (default: fine-tune one per --likelihood-weights)")
    parser.add_argument("--likelihood-weights", default="1,3", help="fine-tune one run per weight w (p(y | x)^w), comma-separated; (w, γ) are selected together on train images")
    parser.add_argument("--iterations", type=int, help="fine-tuning iterations (default: deft's default); a longer run shows when deft passes DPS")
    parser.add_argument("--snapshot-every", type=int, default=20)
    parser.add_argument("--hnet-start", choices=["zero", "gaussian"], help="the h-network's start (default: deft's default)")
    parser.add_argument("--prior-truth", type=int, default=32, help="images drawn from the prior for the prior-is-exact comparison (0: skip)")
    parser.add_argument("--speed-rounds", type=int, default=9, help="interleaved timed rounds (3 left ±7–10 %% noise on the ratio)")
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/results/sample_quality.json"))

    finetune_summaries: dict[str, object] = {}
    run_dirs = args.run or []
    if not run_dirs:
        for weight in (float(w) for w in args.likelihood_weights.split(",")):
            run_dir, finetune_summaries[f"w{weight:g}"] = finetune_run(args, weight)
            run_dirs.append(run_dir)
    runs = {}
    for run_dir in run_dirs:
        run = open_run(run_dir, torch.device("cpu"))
        runs[run.htransform.config.likelihood_weight] = run
    base = runs[min(runs, key=lambda w: abs(w - 1))]  # the posterior's run (w = 1) where there is one
    images, x = val_images(base, args.n)
    y = base.operator.measure(x, generator=torch.Generator().manual_seed(0))
    steps = base.spec.time_steps
    rec = Reconstructor(base.prior, base.operator, base.htransform, steps, denoise_final=True)
    sweep_spec = EvalSpec(batch_size=args.batch_size)
    zeta, sweep = sweep_on_train(rec, "dps", sweep_spec.dps_sweep, base, sweep_spec, torch.device("cpu"))
    rec = replace(rec, dps_zeta=zeta)

    # deft: per run (w), γ by the same train-image sweep; (w, γ) selected together by its best train PSNR
    deft_configs, gamma_sweeps = {}, {}
    for weight, run in runs.items():
        run_rec = replace(rec, htransform=run.htransform)
        gamma, table = sweep_on_train(run_rec, "deft", sweep_spec.guidance_sweep, run, sweep_spec, torch.device("cpu"))
        gamma_sweeps[f"w{weight:g}"] = {"table": table, "selected": gamma, "best_train_psnr": max(row["psnr"] for row in table)}
        deft_configs[f"deft_w{weight:g}"] = replace(run_rec, guidance_scale=1.0)
        deft_configs[f"deft_w{weight:g}_guided"] = replace(run_rec, guidance_scale=gamma)
    selected_weight = max(runs, key=lambda w: gamma_sweeps[f"w{w:g}"]["best_train_psnr"])
    selected = f"deft_w{selected_weight:g}_guided"

    methods, psnr_of_means = {}, {}
    for name, method, method_rec in (("dagger", "dagger", rec), ("prior", "prior", rec), ("dps", "dps", rec),
                                     *((name, "deft", deft_rec) for name, deft_rec in deft_configs.items())):
        k = 1 if method == "dagger" else args.k
        per_image, _, seconds = per_image_metrics(method_rec, method, x, y, images, k, args.batch_size, seed=0)
        methods[name] = {**method_rec.settings(method), **summarise(per_image, seconds, len(images), k)}
        psnr_of_means[name] = per_image["psnr_mean"]
        print(f"{name:16s} PSNR sample {methods[name]['psnr_sample']:6.2f}  PSNR mean {methods[name]['psnr_mean']:6.2f}  "
              f"SSIM mean {methods[name]['ssim_mean']:.3f}  {methods[name]['seconds_per_image']:.2f} s/image", flush=True)

    speed = interleaved_seconds_per_image({m: (rec, m) for m in ("deft", "dps", "prior")}, y[: args.batch_size], args.speed_rounds)
    print("seconds per image (median of interleaved rounds): " + ", ".join(f"{m} {v['median']:.3f}" for m, v in speed.items()), flush=True)

    neighbours = sorted(z for z in EvalSpec().dps_sweep if zeta / 3.5 <= z <= zeta * 3.5)
    prior_truth = prior_truth_comparison(rec, deft_configs, args.prior_truth, args.k, args.batch_size, neighbours) if args.prior_truth else None

    curves = {}
    for weight, run in runs.items():
        curve = []
        for path in sorted((run.path / "snapshots").glob("hnet_step_*.safetensors")):
            htransform, meta = load_htransform(path, run.prior)
            row = {"step": meta["step"], "finetune_minutes": round(meta["seconds"] / 60, 2)}
            for key in (f"deft_w{weight:g}", f"deft_w{weight:g}_guided"):
                snap = replace(deft_configs[key], htransform=htransform.eval())
                per_image, _, seconds = per_image_metrics(snap, "deft", x, y, images, args.k, args.batch_size, seed=0)
                row[key] = {"guidance_scale": snap.guidance_scale, **summarise(per_image, seconds, len(images), args.k)}
            curve.append(row)
            print(f"w = {weight:g}, snapshot step {row['step']:4d} ({row['finetune_minutes']:5.2f} min)  PSNR mean "
                  + ", ".join(f"γ = {row[key]['guidance_scale']:g}: {row[key]['psnr_mean']:6.2f}" for key in row if key.startswith("deft")), flush=True)
        curves[f"w{weight:g}"] = curve

    def minutes_to_pass_dps(key: str, curve: list[dict]) -> float | None:
        passed = [row for row in curve if row[key]["psnr_mean"] > methods["dps"]["psnr_mean"]]
        return passed[0]["finetune_minutes"] if passed else None
    posterior = f"deft_w{base.htransform.config.likelihood_weight:g}"
    result = {
        "setup": {"data": f"petals val, first {len(images)}", "operator": base.operator.describe(), "time_steps": steps, "k": args.k,
                  "runs": {f"w{w:g}": str(run.path) for w, run in runs.items()}, "threads": args.threads, "torch": torch.__version__,
                  "platform": platform.platform()},
        "finetune": finetune_summaries or None,
        "dps_sweep": {"images": f"first {SWEEP_IMAGES} of train", "table": sweep, "selected": zeta},
        "guidance_sweep": {"images": f"first {SWEEP_IMAGES} of train", "runs": gamma_sweeps,
                           "selected": {"likelihood_weight": selected_weight, "guidance_scale": deft_configs[selected].guidance_scale, "method": selected}},
        "methods": methods,
        "against_dps_per_image": {name: paired_difference(psnr_of_means[name], psnr_of_means["dps"]) for name in deft_configs},
        "sampling_speed": {"batch": min(args.batch_size, len(images)), "rounds": args.speed_rounds, "deft_run": str(base.path),
                           "seconds_per_image": speed},
        "curves": curves,
        "prior_truth": prior_truth,
        "targets": {
            "deft_posterior_mean_psnr_above_dps": methods[posterior]["psnr_mean"] > methods["dps"]["psnr_mean"],
            "deft_posterior_mean_psnr_above_dagger": methods[posterior]["psnr_mean"] > methods["dagger"]["psnr_mean"],
            "deft_selected_mean_psnr_above_dps": methods[selected]["psnr_mean"] > methods["dps"]["psnr_mean"],
            "deft_selected_minus_dps_psnr_mean": round(methods[selected]["psnr_mean"] - methods["dps"]["psnr_mean"], 3),
            "dps_over_deft_seconds_per_image": round(speed["dps"]["median"] / speed["deft"]["median"], 2),
            "finetune_minutes_to_pass_dps": {key: minutes_to_pass_dps(key, curves[f"w{w:g}"]) for w in runs
                                              for key in (f"deft_w{w:g}", f"deft_w{w:g}_guided")},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
