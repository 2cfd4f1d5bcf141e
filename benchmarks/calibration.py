"""Calibration of deft's and DPS's uncertainty on 4× super-resolution, σ_y = 0.05: coverage of credible intervals.

For one fine-tuned run (``--run``; made by ``deft finetune --operator superres --factor 4``), deft
samples its fine-tuned posterior (``deft``: γ = 1, the ``sde`` sampler) and, as ``deft_tuned``, with the
sampling settings the run recorded from the prior's tuned defaults (``deft sample``'s and ``deft eval``'s
defaults; the same as ``deft`` for a run without them); DPS runs at the ζ that ``deft eval``'s sweep on
train images selects; all at the run's N with the Tweedie-denoised last step and ``deft eval``'s sampler
streams (seed 0). Each draws k samples per image for the first ``--n`` images of two truths, measured
once (seed 0):

- ``prior_truth``: samples of the shipped prior (``sample_quality.py``'s prior truth). The prior is
  exact there, so samples of the model's exact posterior would cover at the nominal rate: a curve's
  distance from the diagonal is its sampler's own error;
- ``petals_val``: the first val images, where the prior is only an approximation of the data, so the
  coverage also holds what that mismatch costs.

Per method and truth: the coverage and mean width of the central credible intervals at 10 … 90 %, the
fraction of pixels within one std of the sample mean (and its Gaussian reference for k), and the
posterior-mean PSNR (:mod:`deftcli.calibration`). k = 16 reaches central intervals up to
15/17 = 88 %, so 90 % is null. Writes JSON and the calibration plot::

    python benchmarks/calibration.py --run benchmarks/results/runs/cal [--n 32 -k 16]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from common import PRIOR_TRUTH, parse_with_evaluation_arguments, prior_truth_images, summarise, val_images

from deftcli import calibration
from deftcli.evaluate import SWEEP_IMAGES, knob_candidates, per_image_metrics, sweep_on_train
from deftcli.methods import DeftSampler, DPSSampler, SamplingSetup
from deftcli.runs import open_run
from deftcli.specs import EvalSpec
from deftcli.tuning import recorded_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished 4× super-resolution run")
    args = parse_with_evaluation_arguments(parser, Path("benchmarks/results/calibration.json"), n=32, k=16)

    run = open_run(args.run, torch.device("cpu"))
    setup = SamplingSetup(run.prior, run.spec.time_steps, denoise_final=True)
    deft, dps = DeftSampler(setup, run.operator, run.htransform), DPSSampler(setup, run.operator)
    sweep_spec = EvalSpec(batch_size=args.batch_size)
    chosen, sweep = sweep_on_train(
        dps,
        run.operator,
        run.prior.image_shape,
        knob_candidates(sweep_spec, "dps")[0],
        run.spec.data,
        sweep_spec,
        torch.device("cpu"),
    )
    zeta = chosen["dps_zeta"]
    tuned = deft.with_settings(**recorded_sampling(run.info).model_dump())
    methods = {"deft": deft, "deft_tuned": tuned, "dps": dps.with_settings(dps_zeta=zeta)}

    images, petals = val_images(run, args.n)
    truths = {
        "prior_truth": (f"{len(images)} {PRIOR_TRUTH}", prior_truth_images(run.prior, len(images))),
        "petals_val": (f"petals val, first {len(images)}", petals),
    }
    result: dict[str, object] = {
        "setup": {
            "operator": run.operator.describe(),
            "time_steps": run.spec.time_steps,
            "k": args.k,
            "run": str(args.run),
            "likelihood_weight": run.htransform.config.likelihood_weight,
            "guidance_scale": deft.guidance_scale,
            "threads": args.threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "dps_sweep": {"images": f"first {SWEEP_IMAGES} of train", "table": sweep, "selected": zeta},
    }
    curves = {}
    for truth_name, (description, x) in truths.items():
        y = run.operator.measure(x, generator=torch.Generator().manual_seed(0))
        rows = {}
        for name, sampler in methods.items():
            per_image, samples, seconds = per_image_metrics(
                sampler, run.operator, x, y, images, args.k, args.batch_size, seed=0
            )
            cal = calibration.summarise(calibration.per_image_calibration(samples, x), args.k)
            rows[name] = {
                **sampler.settings(),
                **summarise(per_image, seconds, len(images), args.k),
                "calibration": cal,
            }
            curves[f"{name}, {truth_name.replace('_', ' ')}"] = cal["coverage"]
            covered = "  ".join(f"{p}: {c if c is None else f'{c:.3f}'}" for p, c in cal["coverage"].items())
            one_std = f"within 1 std {cal['within_one_std']:.3f} (Gaussian {cal['within_one_std_gaussian']:.3f})"
            print(
                f"{truth_name:11s} {name:10s} PSNR mean {rows[name]['psnr_mean']:6.2f} coverage {covered} {one_std}",
                flush=True,
            )
        result[truth_name] = {"images": description, "methods": rows}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    title = f"4x super-resolution, k = {args.k}, n = {len(images)}"
    calibration.save_calibration_plot(curves, args.out.with_suffix(".png"), title)


if __name__ == "__main__":
    main()
