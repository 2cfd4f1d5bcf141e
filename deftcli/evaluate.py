"""``deft eval``: image metrics on a data split for the fine-tuned run and the baselines.

For the first n images of the split, measurements are made once with a fixed seed; every method
then draws k samples per measurement from the same starting noise. Reported per method: PSNR and
SSIM (torchmetrics, images mapped to [0, 1]) of the samples (averaged) and of the posterior mean
over k, the data residual ‖A x̂ − y‖/√m against σ_y, seconds and network evaluations per image.
DPS uses the ζ that a small sweep on *training* images selects (reported), unless ζ is given.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .checkpoint import write_json
from .data import open_dataset
from .devices import resolve_device
from .errors import DeftError
from .images import colormap, image_grid, save_image, to_unit, upsample_to
from .methods import Reconstructor
from .runs import FinetunedRun, open_run
from .sample import data_residual
from .specs import EvalSpec

SWEEP_IMAGES = 8
GRID_COLUMNS = 8


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image PSNR in dB of [-1, 1] images, computed on [0, 1]."""
    return peak_signal_noise_ratio(to_unit(x), to_unit(ref), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image SSIM of [-1, 1] images, computed on [0, 1] (Gaussian window 11, σ 1.5)."""
    return structural_similarity_index_measure(to_unit(x), to_unit(ref), data_range=1.0, reduction="none")


def draw_per_image(rec: Reconstructor, method: str, y: Tensor, k: int, batch_size: int, seed: int) -> Tensor:
    """k samples for each measurement, (n, k, C, H, W); the same seed for every method."""
    generator = torch.Generator(device=y.device).manual_seed(seed)
    ys = y.repeat_interleave(k, dim=0)
    chunks = [rec.sample(method, ys[i : i + batch_size], generator) for i in range(0, ys.shape[0], batch_size)]
    return torch.cat(chunks).reshape(y.shape[0], k, *rec.prior.image_shape)


def method_metrics(rec: Reconstructor, method: str, x_true: Tensor, y: Tensor, k: int, batch_size: int, seed: int) -> tuple[dict[str, Any], Tensor]:
    start = time.perf_counter()
    samples = draw_per_image(rec, method, y, k, batch_size, seed)
    seconds = time.perf_counter() - start
    n = x_true.shape[0]
    flat = samples.flatten(0, 1)
    truth = x_true.repeat_interleave(k, dim=0)
    mean = samples.mean(1)
    residual = data_residual(rec.operator, flat, y.repeat_interleave(k, dim=0))
    cost = rec.cost(method).as_dict()
    metrics = {
        "k": k,
        "psnr_sample": float(psnr(flat, truth).mean()),
        "ssim_sample": float(ssim(flat, truth).mean()),
        "psnr_mean": float(psnr(mean, x_true).mean()),
        "ssim_mean": float(ssim(mean, x_true).mean()),
        "data_residual": float(residual.mean()),
        "sigma_y": rec.operator.sigma,
        "seconds_per_image": seconds / n,
        "seconds_per_sample": seconds / (n * k),
        **{f"{key}_per_image": v * k for key, v in cost.items()},
    }
    return metrics, samples


def sweep_dps_zeta(rec: Reconstructor, run: FinetunedRun, spec: EvalSpec, device: torch.device) -> tuple[float, list[dict[str, float]]]:
    """Pick ζ by the PSNR of one DPS sample per image on the first training images."""
    train = open_dataset(run.spec.data, "train", rec.prior.image_shape[-1], rec.prior.image_shape[0])
    x = train.batch(range(min(SWEEP_IMAGES, len(train)))).to(device)
    y = rec.operator.measure(x, generator=torch.Generator(device="cpu").manual_seed(spec.seed + 7)).to(device)
    table = []
    for zeta in spec.dps_sweep:
        rec.dps_zeta = zeta
        samples = draw_per_image(rec, "dps", y, 1, spec.batch_size, spec.seed)[:, 0]
        table.append({"zeta": zeta, "psnr": float(psnr(samples, x).nan_to_num(0.0).mean())})
    best = max(table, key=lambda row: row["psnr"])
    return best["zeta"], table


def output_folder(spec: EvalSpec, run: FinetunedRun, force: bool) -> Path:
    out = Path(spec.out) if spec.out else run.path / f"eval-{spec.split}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()) and not force:
        raise DeftError(f"{out}: exists and is not empty (choose another -o or pass --force)")
    return out


def evaluate(spec: EvalSpec, force: bool = False) -> dict[str, Any]:
    device = resolve_device(spec.device)
    run = open_run(spec.run, device)
    out = output_folder(spec, run, force)
    prior, operator = run.prior, run.operator
    dataset = open_dataset(run.spec.data, spec.split, prior.image_shape[-1], prior.image_shape[0])
    n = min(spec.n, len(dataset))
    x_true = dataset.batch(range(n)).to(device)
    y = operator.measure(x_true, generator=torch.Generator(device="cpu").manual_seed(spec.seed)).to(device)
    steps = spec.steps or run.spec.time_steps
    rec = Reconstructor(prior, operator, run.htransform, steps, spec.denoise_final)
    results: dict[str, Any] = {
        "run": str(run.path), "split": spec.split, "n": n, "k": spec.k, "steps": steps, "seed": spec.seed,
        "operator": operator.describe(), "prior": prior.identity(), "device": str(device), "methods": {},
    }
    if "dps" in spec.methods:
        if spec.dps_zeta is None:
            zeta, sweep = sweep_dps_zeta(rec, run, spec, device)
            results["dps_sweep"] = {"images": f"first {SWEEP_IMAGES} of train", "table": sweep, "selected": zeta}
        else:
            zeta = spec.dps_zeta
        rec.dps_zeta = zeta
        results["dps_zeta"] = zeta
    samples: dict[str, Tensor] = {}
    for method in spec.methods:
        k = 1 if method == "dagger" else spec.k
        metrics, samples[method] = method_metrics(rec, method, x_true, y, k, spec.batch_size, spec.seed)
        results["methods"][method] = metrics
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    save_image(result_grid(x_true, y, samples, operator), out / "grid.png")
    print_table(results)
    return {"out": str(out), "results": str(out / "results.json"), "grid": str(out / "grid.png")}


def result_grid(x_true: Tensor, y: Tensor, samples: dict[str, Tensor], operator) -> Tensor:
    """Rows: ground truth, measurement, deft samples, deft mean, deft std, DPS sample (those evaluated)."""
    cols = min(GRID_COLUMNS, x_true.shape[0])
    size = tuple(x_true.shape[-2:])
    rows = [x_true[:cols], upsample_to(y[:cols], size) if y.shape[-2:] != size else y[:cols]]
    if rows[1].shape[1] != rows[0].shape[1]:
        rows[1] = operator.A_dagger(y[:cols])
    if "deft" in samples:
        deft = samples["deft"][:cols]
        rows += [deft[:, i] for i in range(min(2, deft.shape[1]))]
        rows.append(deft.mean(1))
        rows.append(torch.stack([colormap(s.std(0).mean(0).cpu()) for s in deft]) if deft.shape[1] > 1 else torch.zeros_like(deft[:, 0]))
    if "dps" in samples:
        rows.append(samples["dps"][:cols, 0])
    return image_grid([r.cpu() for r in rows])


def print_table(results: dict[str, Any]) -> None:
    table = Table(title=f"deft eval — {results['operator']}, {results['split']} (n={results['n']}, k={results['k']}, {results['steps']} steps)")
    for col in ("method", "PSNR sample", "SSIM sample", "PSNR mean", "SSIM mean", "‖Ax̂−y‖/√m", "σ_y", "s/image", "NFE/image"):
        table.add_column(col, justify="right")
    for name, m in results["methods"].items():
        label = f"dps (ζ={results['dps_zeta']:g})" if name == "dps" else name
        nfe = m["nfe_prior_per_image"] + m["nfe_hnet_per_image"]
        table.add_row(label, f"{m['psnr_sample']:.2f}", f"{m['ssim_sample']:.3f}", f"{m['psnr_mean']:.2f}", f"{m['ssim_mean']:.3f}",
                      f"{m['data_residual']:.4f}", f"{m['sigma_y']:g}", f"{m['seconds_per_image']:.2f}", str(nfe))
    Console(width=None if Console().is_terminal else 130).print(table)
