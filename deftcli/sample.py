"""``deft sample``: posterior samples, their mean and a per-pixel standard-deviation map for measurements."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import write_json
from .data import check_measurement_shape
from .devices import Runtime, resolve_device
from .errors import DeftError
from .images import TENSOR_SUFFIX, colormap, image_grid, list_images, output_folder, read_measurement, save_image
from .methods import PriorSampler, Sampler, SamplingSetup, build_sampler
from .metrics import data_residual
from .priors import load_prior
from .runs import open_run
from .samplers import GeneratorNoise, NoiseSampler
from .specs import SampleSpec
from .tuning import deft_sampling, recorded_sampling

UNCONDITIONAL_STEPS = 100


def draw(sampler: Sampler, y: Tensor, n: int, batch_size: int, noise: NoiseSampler) -> Tensor:
    """n samples for one measurement y (C, h, w), in batches."""
    out = []
    while sum(x.shape[0] for x in out) < n:
        b = min(batch_size, n - sum(x.shape[0] for x in out))
        out.append(sampler.sample(y[None].expand(b, *y.shape), noise))
    return torch.cat(out)


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Never overwrite earlier outputs silently; an output folder that is a file is refused even with --force."""
    for folder in dict.fromkeys(p.parent for p in paths):
        if folder.exists() and not folder.is_dir():
            raise DeftError(f"{folder}: exists and is not a folder (choose another -o)")
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise DeftError(f"{existing[0]}: exists (choose another -o or pass --force to overwrite)")


def output_files(folder: Path, n: int, extra: tuple[str, ...]) -> list[Path]:
    """Every file a sampling command writes into ``folder``: ``sample_000.png`` … and ``extra``."""
    return [folder / f"sample_{i:03d}.png" for i in range(n)] + [folder / name for name in extra]


def measurement_inputs(source: Path) -> list[Path]:
    if source.is_dir():
        files = list_images(source)
        if not files:
            raise DeftError(f"{source}: folder holds no measurement images or .safetensors files")
        return files
    if not source.exists():
        raise DeftError(f"{source}: no such file")
    return [source]


def sample_command(spec: SampleSpec, measurement: Path | None, force: bool) -> dict[str, Any]:
    device = resolve_device(spec.device)
    out = Path(spec.out)
    noise = GeneratorNoise(torch.Generator(device=device).manual_seed(spec.seed))
    if spec.unconditional and measurement is not None:
        raise DeftError(
            f"--unconditional draws prior samples, which take no measurement ({measurement}): give one or the other"
        )
    if spec.unconditional or measurement is None:
        if not spec.unconditional:
            raise DeftError("give a measurement image (or a folder of them), or --unconditional for prior samples")
        return sample_unconditional(spec, out, device, noise, force)

    run = open_run(spec.run, device, prior_override=spec.prior.path)
    runtime = Runtime.resolve(device, spec.precision, spec.compile)
    runtime.adapt(run.prior, run.htransform)
    steps = spec.steps or run.spec.time_steps
    sampling = deft_sampling(recorded_sampling(run.info), spec.guidance_scale, spec.sampler, spec.renoise_zeta)
    settings = {
        "dps_zeta": spec.dps_zeta,
        "diffpir_lambda": spec.diffpir_lambda,
        "diffpir_zeta": spec.diffpir_zeta,
        "ddrm_eta": spec.ddrm_eta,
        "ddrm_eta_b": spec.ddrm_eta_b,
        **sampling.model_dump(),
    }
    setup = SamplingSetup(run.prior, steps, spec.denoise_final, spec.clip_x0)
    sampler = build_sampler(spec.method, setup, run.operator, run.htransform, settings)  # before any output exists
    expected = run.operator.measurement_shape(run.prior.image_shape)
    inputs = measurement_inputs(measurement)
    folders = (
        [out] if len(inputs) == 1 else [out / p.name.removesuffix(TENSOR_SUFFIX).rsplit(".", 1)[0] for p in inputs]
    )
    for i, folder in enumerate(folders):  # a.png and a.safetensors would write the same out/a/
        if folder in folders[:i]:
            raise DeftError(
                f"{inputs[folders.index(folder)]} and {inputs[i]} would both write {folder}/ (rename one of them)"
            )
    measurements = []
    for path in inputs:
        y = read_measurement(path)
        check_measurement_shape(y, expected, run.prior.image_shape, path, run.operator)
        measurements.append(y.to(device))
    refuse_existing(
        [p for f in folders for p in output_files(f, spec.n, ("mean.png", "std.png", "summary.json"))], force
    )
    for folder in folders:  # before sampling, so an output location that cannot be written fails at once
        output_folder(folder)

    summaries = []
    for path, y, folder in zip(inputs, measurements, folders):
        start = time.perf_counter()
        x = draw(sampler, y, spec.n, spec.batch_size, noise)
        seconds = time.perf_counter() - start
        for i, xi in enumerate(x):
            save_image(xi, folder / f"sample_{i:03d}.png")
        mean = x.mean(0)
        std = x.std(0).mean(0) if x.shape[0] > 1 else torch.zeros(x.shape[-2:], device=x.device)
        save_image(mean, folder / "mean.png")
        save_image(colormap(std.cpu()), folder / "std.png")
        residual = data_residual(run.operator, x, y[None].expand_as(run.operator.A(x)))
        summary = {
            "measurement": str(path),
            "run": str(run.path),
            "prior": run.prior.identity(),
            "method": spec.method,
            **sampler.settings(),
            "operator": run.operator.describe(),
            "n": spec.n,
            "steps": steps,
            "seed": spec.seed,
            "sigma_y": run.operator.sigma,
            "data_residual": [round(float(r), 5) for r in residual],
            "data_residual_of_mean": round(float(data_residual(run.operator, mean[None], y[None])[0]), 5),
            "std_max": round(float(std.max()), 5),
            "std_mean": round(float(std.mean()), 5),
            "seconds": round(seconds, 3),
            "seconds_per_sample": round(seconds / spec.n, 4),
            "runtime": runtime.describe(),
            **sampler.cost().as_dict(),
        }
        write_json(summary, folder / "summary.json")
        summaries.append(summary)
    return {
        "out": str(out),
        "measurements": len(inputs),
        "method": spec.method,
        "seconds": round(sum(s["seconds"] for s in summaries), 2),
        "data_residual_mean": round(
            sum(sum(s["data_residual"]) for s in summaries) / sum(len(s["data_residual"]) for s in summaries), 5
        ),
        "sigma_y": run.operator.sigma,
    }


def sample_unconditional(
    spec: SampleSpec, out: Path, device: torch.device, noise: NoiseSampler, force: bool
) -> dict[str, Any]:
    """Prior samples: ``sample_###.png``, a ``grid.png`` and ``summary.json``."""
    prior = load_prior(spec.prior.path or (open_run(spec.run, device).spec.prior.path if spec.run else None)).to(device)
    runtime = Runtime.resolve(device, spec.precision, spec.compile)
    runtime.adapt(prior)
    sampler = PriorSampler(SamplingSetup(prior, spec.steps or UNCONDITIONAL_STEPS, spec.denoise_final, spec.clip_x0))
    refuse_existing(output_files(out, spec.n, ("grid.png", "summary.json")), force)
    output_folder(out)
    start = time.perf_counter()
    chunks = []
    for i in range(0, spec.n, spec.batch_size):
        b = min(spec.batch_size, spec.n - i)
        chunks.append(sampler.unconditional(b, device, noise))
    x = torch.cat(chunks)
    seconds = time.perf_counter() - start
    for i, xi in enumerate(x):
        save_image(xi, out / f"sample_{i:03d}.png")
    per_row = 8
    save_image(image_grid([x[i : i + per_row] for i in range(0, x.shape[0], per_row)]), out / "grid.png")
    summary = {
        "prior": prior.identity(),
        "n": spec.n,
        "steps": sampler.setup.steps,
        "seed": spec.seed,
        "clip_x0": spec.clip_x0,
        "denoise_final": spec.denoise_final,
        "seconds": round(seconds, 3),
        "runtime": runtime.describe(),
        **sampler.cost().as_dict(),
    }
    write_json(summary, out / "summary.json")
    return {"out": str(out), **summary}
