"""``deft eval``: image metrics on a data split for the fine-tuned run and the baselines.

For the first n images of the split, measurements are made once with a fixed seed; every method
then draws k samples per measurement from the same starting noise. Sample j of image i has its
own random stream (seed, i, j), so results do not depend on batching or on how ``torchrun``
shards the images over processes (rank r evaluates images r, r + R, …; rank 0 gathers and writes).
Reported per method: PSNR and SSIM (torchmetrics, images mapped to [0, 1]) of the samples (averaged)
and of the posterior mean over k, the data residual ‖A x̂ − y‖/√m against σ_y, seconds and network
evaluations per image, and, for every method that samples (all but the deterministic A†y), the
coverage of its central credible intervals by the truth (:mod:`deftcli.calibration`), plotted in ``calibration.png``.
DPS uses the ζ that a small sweep on *training* images selects (reported), unless ζ is given; deft
samples its fine-tuned posterior (γ = 1) unless a guidance scale γ is given, or ``sweep`` selects γ
on the same training images.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from . import calibration
from .checkpoint import write_json
from .data import open_dataset
from .devices import Runtime, resolve_device
from .distributed import Distributed, setup, teardown
from .errors import DeftError
from .images import colormap, image_grid, save_image, upsample_to
from .images import output_folder as make_output_folder
from .methods import Sampler, SamplingSetup, build_sampler, operator_svd
from .metrics import data_residual, psnr, ssim
from .operators import Operator
from .runs import FinetunedRun, open_run
from .samplers import PerSampleNoise
from .specs import EVAL_METHODS, SPECTRAL_METHODS, DataSpec, EvalSpec
from .tuning import deft_sampling, recorded_sampling

SWEEP_IMAGES = 8
GRID_COLUMNS = 8


def sample_generators(seed: int, images: Sequence[int], k: int, device: torch.device) -> list[torch.Generator]:
    """One generator per (image, sample): the noise of a sample does not depend on its batch."""
    return [
        torch.Generator(device=device).manual_seed((seed * 1_000_003 + 1000 * i + j) % 2**63)
        for i in images
        for j in range(k)
    ]


def draw_per_image(sampler: Sampler, y: Tensor, images: Sequence[int], k: int, batch_size: int, seed: int) -> Tensor:
    """k samples for each measurement, (n, k, C, H, W); the same streams for every method."""
    generators = sample_generators(seed, images, k, y.device)
    ys = y.repeat_interleave(k, dim=0)
    chunks = [
        sampler.sample(ys[i : i + batch_size], PerSampleNoise(generators[i : i + batch_size]))
        for i in range(0, ys.shape[0], batch_size)
    ]
    samples = torch.cat(chunks)
    return samples.reshape(y.shape[0], k, *samples.shape[1:])


def per_image_metrics(
    sampler: Sampler,
    operator: Operator,
    x_true: Tensor,
    y: Tensor,
    images: Sequence[int],
    k: int,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, Tensor], Tensor, float]:
    """Per-image PSNR/SSIM of samples (averaged over k) and of their mean, data residual ‖A x − y‖/√m; samples;
    seconds."""
    start = time.perf_counter()
    samples = draw_per_image(sampler, y, images, k, batch_size, seed)
    seconds = time.perf_counter() - start
    n = x_true.shape[0]
    flat = samples.flatten(0, 1)
    truth = x_true.repeat_interleave(k, dim=0)
    mean = samples.mean(1)
    per_image = {
        "psnr_sample": psnr(flat, truth).reshape(n, k).mean(1),
        "ssim_sample": ssim(flat, truth).reshape(n, k).mean(1),
        "psnr_mean": psnr(mean, x_true),
        "ssim_mean": ssim(mean, x_true),
        "data_residual": data_residual(operator, flat, y.repeat_interleave(k, dim=0)).reshape(n, k).mean(1),
    }
    return {key: v.detach().cpu() for key, v in per_image.items()}, samples, seconds


def interleaved_seconds_per_image(samplers: dict[str, Sampler], y: Tensor, rounds: int) -> dict[str, dict[str, Any]]:
    """Seconds per image of each named sampler on the same batch y: one sample per row,
    the samplers interleaved over ``rounds`` timed rounds after a warm-up round, so that none pays for
    another's warm-up or runs only while the machine is cool; the median per sampler and every round."""
    times: dict[str, list[float]] = {name: [] for name in samplers}
    images = range(y.shape[0])
    for round_index in range(rounds + 1):
        for name, sampler in samplers.items():
            began = time.perf_counter()
            draw_per_image(sampler, y, images, 1, y.shape[0], seed=round_index)
            if round_index:
                times[name].append((time.perf_counter() - began) / y.shape[0])
    return {
        name: {"median": round(statistics.median(t), 4), "all": [round(v, 4) for v in t]} for name, t in times.items()
    }


SWEPT: dict[str, dict[str, str]] = {
    "dps": {"dps_zeta": "zeta"},
    "deft": {"guidance_scale": "gamma"},
    "diffpir": {"diffpir_lambda": "lambda", "diffpir_zeta": "zeta"},
}
"""The knobs of each tunable method: its setting (:meth:`~deftcli.methods.Sampler.settings`) → its key in a sweep
table (DPS's step size ζ, deft's guidance scale γ, DiffPIR's λ and ζ)."""


def knob_candidates(spec: EvalSpec, method: str) -> tuple[list[dict[str, float]], bool]:
    """The settings (name → value) to try for ``method``'s knobs, and whether that is a sweep: a knob given in the
    spec keeps its value, one left None takes every value of its sweep grid (all combinations)."""
    given = {
        "dps_zeta": spec.dps_zeta,
        "guidance_scale": None if spec.guidance_scale == "sweep" else spec.guidance_scale,
        "diffpir_lambda": spec.diffpir_lambda,
        "diffpir_zeta": spec.diffpir_zeta,
    }
    grids = {
        "dps_zeta": spec.dps_sweep,
        "guidance_scale": spec.guidance_sweep,
        "diffpir_lambda": spec.diffpir_sweep.lambdas,
        "diffpir_zeta": spec.diffpir_sweep.zetas,
    }
    choices = {field: [given[field]] if given[field] is not None else list(grids[field]) for field in SWEPT[method]}
    candidates = [dict(zip(choices, values)) for values in itertools.product(*choices.values())]
    return candidates, any(given[field] is None for field in SWEPT[method])


def sweep_on_train(
    sampler: Sampler,
    operator: Operator,
    image_shape: Sequence[int],
    candidates: Sequence[dict[str, float]],
    data: DataSpec,
    spec: EvalSpec,
    device: torch.device,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Pick the sampler's knobs (:data:`SWEPT`) among ``candidates`` (dicts setting → value) by the PSNR of one
    sample per image on the first training images of ``data`` (of the prior's ``image_shape``).

    The training images and their measurements (seed + 7) are the same for every method and value,
    and never the evaluated split's. Returns the best candidate and the table (one row per candidate:
    the knobs under their :data:`SWEPT` keys and the PSNR).
    """
    keys = SWEPT[sampler.method]
    train = open_dataset(data, "train", image_shape[-1], image_shape[0])
    images = range(min(SWEEP_IMAGES, len(train)))
    x = train.batch(images).to(device)
    y = operator.measure(x, generator=torch.Generator(device="cpu").manual_seed(spec.seed + 7)).to(device)
    table = []
    for candidate in candidates:
        samples = draw_per_image(sampler.with_settings(**candidate), y, images, 1, spec.batch_size, spec.seed)[:, 0]
        knobs = {keys.get(field, field): value for field, value in candidate.items()}
        table.append({**knobs, "psnr": float(psnr(samples, x).nan_to_num(0.0).mean())})
    best = max(range(len(table)), key=lambda i: table[i]["psnr"])
    return dict(candidates[best]), table


def evaluated_methods(spec: EvalSpec, operator: Operator, tell: bool = True) -> list[str]:
    """The methods to evaluate: ``spec.methods``, or all of :data:`~deftcli.specs.EVAL_METHODS` less the SVD-based
    ones when the operator has no SVD (said on stderr when ``tell``); an SVD-based method asked for explicitly
    needs the SVD."""
    if operator.svd() is not None:
        return list(spec.methods or EVAL_METHODS)
    for method in spec.spectral_methods_asked():
        operator_svd(method, operator)
    if spec.methods is None and tell:
        left_out = " and ".join(SPECTRAL_METHODS)
        print(
            f"deft: note: operator '{operator.name}' has no singular value decomposition, "
            f"so {left_out} are not evaluated",
            file=sys.stderr,
        )
    return [m for m in spec.methods or EVAL_METHODS if m not in SPECTRAL_METHODS]


def output_folder(spec: EvalSpec, run: FinetunedRun, force: bool) -> Path:
    """The output folder, made once the data set has opened and before any sampling, so that a location that cannot
    be written fails at once."""
    out = Path(spec.out) if spec.out else run.path / f"eval-{spec.split}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DeftError(f"{out}: exists and is not empty (choose another -o or pass --force)")
    for name in ("results.json", "grid.png", "calibration.png"):
        if (out / name).is_dir():
            raise DeftError(
                f"{out / name}: is a folder, so the results cannot be written there (move it or choose another -o)"
            )
    return make_output_folder(out)


def evaluate(spec: EvalSpec, force: bool = False) -> dict[str, Any]:
    ctx = setup(resolve_device(spec.device))
    try:
        return _evaluate(spec, force, ctx)
    finally:
        teardown(ctx)


def _evaluate(spec: EvalSpec, force: bool, ctx: Distributed) -> dict[str, Any]:
    device = ctx.device(resolve_device(spec.device))
    run = open_run(spec.run, device)
    prior, operator = run.prior, run.operator
    runtime = Runtime.resolve(device, spec.precision, spec.compile)
    runtime.adapt(prior, run.htransform)
    dataset = open_dataset(run.spec.data, spec.split, prior.image_shape[-1], prior.image_shape[0])
    methods = evaluated_methods(spec, operator, tell=ctx.is_main)
    out = Path(ctx.broadcast(str(output_folder(spec, run, force)) if ctx.is_main else None))
    n = min(spec.n, len(dataset))
    if n < spec.n and ctx.is_main:
        print(
            f"deft: warning: the {spec.split} split has {n} images; evaluating all {n}, not --n {spec.n}",
            file=sys.stderr,
        )
    mine = list(ctx.shard(n))
    x_all = dataset.batch(range(n))
    y_all = operator.measure(x_all, generator=torch.Generator(device="cpu").manual_seed(spec.seed))
    x_true, y = x_all[mine].to(device), y_all[mine].to(device)
    steps = spec.steps or run.spec.time_steps
    gamma = None if spec.guidance_scale == "sweep" else spec.guidance_scale
    sampling = deft_sampling(recorded_sampling(run.info), gamma, spec.sampler, spec.renoise_zeta)
    if spec.guidance_scale != "sweep":
        spec = spec.model_copy(update={"guidance_scale": sampling.guidance_scale})
    setup = SamplingSetup(prior, steps, spec.denoise_final, spec.clip_x0)
    settings = {**sampling.model_dump(), "ddrm_eta": spec.ddrm_eta, "ddrm_eta_b": spec.ddrm_eta_b}
    samplers = {method: build_sampler(method, setup, operator, run.htransform, settings) for method in methods}
    results: dict[str, Any] = {
        "run": str(run.path),
        "split": spec.split,
        "n": n,
        "k": spec.k,
        "steps": steps,
        "seed": spec.seed,
        "clip_x0": spec.clip_x0,
        "operator": operator.describe(),
        "prior": prior.identity(),
        "device": str(device),
        "runtime": runtime.describe(),
        "processes": ctx.world_size,
        "likelihood_weight": run.htransform.config.likelihood_weight,
        "methods": {},
    }
    for method in (m for m in SWEPT if m in methods):
        candidates, swept = knob_candidates(spec, method)
        if swept:
            chosen, sweep = ctx.broadcast(
                sweep_on_train(samplers[method], operator, prior.image_shape, candidates, run.spec.data, spec, device)
                if ctx.is_main
                else None
            )
            selected = {SWEPT[method][field]: value for field, value in chosen.items()}
            results[f"{method}_sweep"] = {
                "images": f"first {SWEEP_IMAGES} of train",
                "table": sweep,
                "selected": next(iter(selected.values())) if len(selected) == 1 else selected,
            }
        else:
            chosen = candidates[0]
        samplers[method] = samplers[method].with_settings(**chosen)
        results.update(chosen)
    for method in ("ddrm", "deft"):
        if method in methods:
            results.update(samplers[method].settings())
    grid_samples: dict[str, Tensor] = {}
    for method, sampler in samplers.items():
        k = 1 if sampler.deterministic else spec.k
        per_image, samples, seconds = per_image_metrics(
            sampler, operator, x_true, y, mine, k, spec.batch_size, spec.seed
        )
        coverage = {} if sampler.deterministic else calibration.per_image_calibration(samples, x_true)
        shown = [(i, s) for i, s in zip(mine, samples.cpu()) if i < GRID_COLUMNS]
        gathered = ctx.gather_objects((mine, per_image, seconds, shown, coverage))
        order = torch.tensor([i for part in gathered for i in part[0]]).argsort()
        values = {key: torch.cat([part[1][key] for part in gathered])[order] for key in per_image}
        coverage = {key: torch.cat([part[4][key] for part in gathered])[order] for key in coverage}
        total_seconds = sum(part[2] for part in gathered)
        grid_samples[method] = torch.stack(
            [s for _, s in sorted((item for part in gathered for item in part[3]), key=lambda item: item[0])]
        )
        cost = sampler.cost().as_dict()
        results["methods"][method] = {
            "k": k,
            **{key: float(v.mean()) for key, v in values.items()},
            "sigma_y": operator.sigma,
            "seconds_per_image": total_seconds / n,
            "seconds_per_sample": total_seconds / (n * k),
            **{f"{key}_per_image": v * k for key, v in cost.items()},
        }
        if coverage:
            results["methods"][method]["calibration"] = {
                **calibration.summarise(coverage, k),
                "per_image": calibration.per_image_lists(coverage),
            }
    curves = {name: m["calibration"]["coverage"] for name, m in results["methods"].items() if "calibration" in m}
    if ctx.is_main:
        write_json(results, out / "results.json")
        cols = min(GRID_COLUMNS, n)
        save_image(result_grid(x_all[:cols], y_all[:cols], grid_samples, operator), out / "grid.png")
        title = f"coverage of central credible intervals, k = {spec.k}"
        calibration.save_calibration_plot(curves, out / "calibration.png", title)
        print_table(results)
        note = calibration.unavailable_note(spec.k) if curves else None
        if note:
            print(f"deft: note: {note}", file=sys.stderr)
    return {
        "out": str(out),
        "results": str(out / "results.json"),
        "grid": str(out / "grid.png"),
        "calibration": str(out / "calibration.png"),
    }


def result_grid(x_true: Tensor, y: Tensor, samples: dict[str, Tensor], operator) -> Tensor:
    """Rows: ground truth, measurement, deft samples, mean and std, a DPS, DiffPIR, DDRM sample (those evaluated)."""
    cols = min(GRID_COLUMNS, x_true.shape[0])
    size = tuple(x_true.shape[-2:])
    rows = [x_true[:cols], upsample_to(y[:cols], size) if y.shape[-2:] != size else y[:cols]]
    if rows[1].shape[1] != rows[0].shape[1]:
        rows[1] = operator.A_dagger(y[:cols])
    if "deft" in samples:
        deft = samples["deft"][:cols]
        rows += [deft[:, i] for i in range(min(2, deft.shape[1]))]
        rows.append(deft.mean(1))
        rows.append(
            torch.stack([colormap(s.std(0).mean(0).cpu()) for s in deft])
            if deft.shape[1] > 1
            else torch.zeros_like(deft[:, 0])
        )
    rows += [samples[baseline][:cols, 0] for baseline in ("dps", "diffpir", "ddrm") if baseline in samples]
    return image_grid([r.cpu() for r in rows])


def print_table(results: dict[str, Any]) -> None:
    """The metrics per method. The coverage column is at the widest of 50/80/90 % that k reaches: the tails, where
    an over-confident sampler shows, at a nominal value that holds for any posterior (the one-std fraction's 68 %
    holds only for Gaussian ones)."""
    table = Table(
        title=f"deft eval — {results['operator']}, {results['split']} "
        f"(n={results['n']}, k={results['k']}, {results['steps']} steps)"
    )
    level = calibration.widest_headline_level(results["k"])
    cover = f"cover {level:.0%}" if level else "cover"
    for col in (
        "method",
        "PSNR sample",
        "SSIM sample",
        "PSNR mean",
        "SSIM mean",
        "‖Ax̂−y‖/√m",
        "σ_y",
        cover,
        "s/image",
        "NFE/image prior/h/∇prior",
    ):
        table.add_column(col, justify="right")
    for name, m in results["methods"].items():
        symbols = {
            "dps": [("ζ", "dps_zeta")],
            "diffpir": [("λ", "diffpir_lambda"), ("ζ", "diffpir_zeta")],
            "ddrm": [("η", "ddrm_eta"), ("η_b", "ddrm_eta_b")],
        }
        settings = ", ".join(f"{symbol}={results[key]:g}" for symbol, key in symbols.get(name, ()))
        label = f"{name} ({settings})" if settings else name
        if name == "deft":
            knobs = [
                f"{symbol}={results[key]:g}"
                for symbol, key in (("w", "likelihood_weight"), ("γ", "guidance_scale"))
                if results[key] != 1
            ]
            if results.get("sampler") == "renoise":
                knobs.append(f"renoise ζ={results['renoise_zeta']:g}")
            label = f"deft ({', '.join(knobs)})" if knobs else name
        # DPS's cost is its backward passes
        nfe = f"{m['nfe_prior_per_image']}/{m['nfe_hnet_per_image']}/{m['backward_prior_per_image']}"
        covered = m.get("calibration", {}).get("coverage", {}).get(f"{level:g}") if level else None
        table.add_row(
            label,
            f"{m['psnr_sample']:.2f}",
            f"{m['ssim_sample']:.3f}",
            f"{m['psnr_mean']:.2f}",
            f"{m['ssim_mean']:.3f}",
            f"{m['data_residual']:.4f}",
            f"{m['sigma_y']:g}",
            "—" if covered is None else f"{covered:.1%}",
            f"{m['seconds_per_image']:.2f}",
            nfe,
        )
    Console(width=None if Console().is_terminal else 130).print(table)
