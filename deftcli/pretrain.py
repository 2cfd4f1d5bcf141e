r"""``deft pretrain``: a UNet prior trained by denoising score matching on the VP-SDE.

Loss (the weighting of the original code), t ~ U(ε, 1), z ~ N(0, I), x_t = α(t) x0 + σ(t) z:

    L(θ) = E ‖ s_θ(x_t, t) σ(t) + z ‖²        (summed over pixels, averaged over the batch)

With ``parametrisation: gaussian-residual`` (the default) s_θ = s_G + UNet, where s_G is the exact
score of the Gaussian with the training data's per-channel mean and variance
(:class:`deftcli.priors.GaussianScore`, fitted on the first 2048 training images); ``plain`` is the
original code's s_θ = UNet.

The output folder is a prior that :func:`deftcli.priors.load_prior` reads: ``config.json``
(architecture, SDE, image shape, data set, command, steps, time, validation loss) and
``model.safetensors`` (the EMA weights, :func:`exponential_moving_average`). ``training_state.safetensors``
holds what ``--resume`` needs.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from . import __version__
from .checkpoint import load_state, read_json, rng_state, save_state, save_weights, set_rng_state, write_json
from .data import open_dataset
from .devices import resolve_device
from .errors import DeftError
from .images import image_grid, output_folder, save_image
from .interrupts import GracefulInterrupt
from .priors import GaussianScore, UNetPrior, unet_score
from .samplers import GeneratorNoise, sample_reverse_sde
from .sde import VPSDE, reverse_time_grid
from .specs import PretrainSpec, read_saved_spec
from .training import (
    MetricsLog,
    TrainingProgress,
    cleared_on_failure,
    refuse_changes,
    refuse_resume_with_nothing_to_do,
    warmup_cosine_schedule,
)
from .unet import UNet

T_EPS = 1e-5
VAL_IMAGES = 256
GAUSSIAN_FIT_IMAGES = 2048
LR_FINAL_FACTOR = 0.1  # the cosine decays the learning rate to lr · this


def dsm_loss(score_fn, sde: VPSDE, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
    """E ‖s_θ(x_t, t) σ(t) + z‖² for given times and noise (sum over pixels, mean over the batch)."""
    score = score_fn(sde.perturb(x0, t, z), t)
    sigma = sde.sigma(t)[:, None, None, None]
    return ((score * sigma + z) ** 2).flatten(1).sum(1).mean()


def exponential_moving_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An average of ``model``'s weights that starts at its initial weights; its update n = 0, 1, … (one per
    training step, :meth:`~torch.optim.swa_utils.AveragedModel.update_parameters`) moves it by 1 − d_n towards
    the weights, with the usual warm-up d_n = min(d, (1 + n)/(10 + n)).

    Without the warm-up an EMA of 0.999 after a few thousand steps still remembers the random
    initialisation (DESIGN.md §3).
    """

    def update(averages: list[Tensor], weights: list[Tensor], n_averaged: Tensor) -> None:
        n = int(n_averaged) - 1  # the initial weights are the first average
        d = min(decay, (1 + n) / (10 + n))
        for average, weight in zip(averages, weights):
            average.lerp_(weight, 1 - d)

    ema = AveragedModel(model, multi_avg_fn=update)
    ema.update_parameters(model)  # the first call copies the weights: the average starts at them
    return ema.eval().requires_grad_(False)


class ValidationSet:
    """A fixed batch of validation images with fixed t and z, so losses are comparable across steps."""

    def __init__(self, images: Tensor, seed: int) -> None:
        g = torch.Generator().manual_seed(seed + 1)
        self.x0 = images
        self.t = torch.rand(images.shape[0], generator=g) * (1 - T_EPS) + T_EPS
        self.z = torch.randn(images.shape, generator=g)

    @torch.no_grad()
    def loss(self, score_fn, sde: VPSDE, device: torch.device, batch: int = 64) -> float:
        total = 0.0
        for i in range(0, self.x0.shape[0], batch):
            sl = slice(i, i + batch)
            x0, t, z = self.x0[sl].to(device), self.t[sl].to(device), self.z[sl].to(device)
            total += dsm_loss(score_fn, sde, x0, t, z).item() * x0.shape[0]
        return total / self.x0.shape[0]


def prior_config(
    spec: PretrainSpec, name: str, gaussian: GaussianScore | None, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": "deft-unet-prior",
        "name": name,
        "image_shape": [spec.channels, spec.image_size, spec.image_size],
        "sde": spec.sde.model_dump(),
        "unet": spec.unet.model_dump(mode="json"),
        "gaussian_residual": None if gaussian is None else {"mean": list(gaussian.mean), "variance": gaussian.variance},
        "training": {"dataset": spec.data.model_dump(), "deft_version": __version__, **extra},
    }


def refuse_prior_change(saved: PretrainSpec, resumed: PretrainSpec) -> None:
    """A resumed leg may change the schedule (iterations, time budget, learning rate, batch, device) and the
    data root, not the data set, the image size, the channels, the parametrisation, the SDE or the network."""
    fixed = ("image_size", "channels", "parametrisation", "sde", "unet")
    changes = {name: (getattr(saved, name), getattr(resumed, name)) for name in fixed}
    refuse_changes(
        "prior", changes | {"dataset": (saved.data.dataset, resumed.data.dataset)}, "train a new prior in another --out"
    )


def pretrain(
    spec: PretrainSpec, resume: bool = False, quiet: bool = False, command: list[str] | None = None
) -> dict[str, Any]:
    """Train a prior as described by ``spec`` into ``spec.out``; returns a summary (steps, seconds, losses)."""
    out = Path(spec.out)
    state_path = out / "training_state.safetensors"
    if resume and not state_path.exists():
        raise DeftError(f"{out}: nothing to resume (no training_state.safetensors)")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise DeftError(f"{out}: output folder exists and is not empty (use --resume to continue it, or another --out)")
    name = spec.name or out.name
    device = resolve_device(spec.device)
    spec = spec.model_copy(
        update={"unet": spec.unet.model_copy(update={"in_channels": spec.channels, "out_channels": spec.channels})}
    )
    spec.unet.check_image_size(spec.image_size, spec.image_size, "--image-size")
    if resume:
        refuse_prior_change(PretrainSpec.model_validate(read_saved_spec(out / "spec.json")), spec)

    torch.manual_seed(spec.seed)
    sde = VPSDE(**spec.sde.model_dump())
    model = UNet(spec.unet, sde.sigma).to(device)
    ema = exponential_moving_average(model, spec.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    schedule = warmup_cosine_schedule(optimizer, [spec.lr], spec.warmup, spec.iterations, final_factor=LR_FINAL_FACTOR)
    train = open_dataset(spec.data, "train", spec.image_size, spec.channels)
    gaussian = (
        GaussianScore.fit(train.batch(range(min(GAUSSIAN_FIT_IMAGES, len(train)))))
        if spec.parametrisation == "gaussian-residual"
        else None
    )
    score_fn, ema_score_fn = unet_score(model, gaussian, sde), unet_score(ema.module, gaussian, sde)
    val_data = open_dataset(spec.data, "val", spec.image_size, spec.channels)
    val = ValidationSet(val_data.batch(range(min(VAL_IMAGES, len(val_data)))), spec.seed)
    data_gen = torch.Generator().manual_seed(spec.seed)
    step, elapsed = 0, 0.0
    metrics = MetricsLog(out / "metrics.jsonl")
    if resume:
        state = load_state(state_path)
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise DeftError(
                f"{state_path}: does not match this prior's network ({' '.join(str(exc).split())[:200]})"
            ) from None
        data_gen.set_state(state["data_rng"])
        set_rng_state(state["rng"])
        step, elapsed = int(state["step"]), float(state["seconds"])
        schedule = warmup_cosine_schedule(optimizer, [spec.lr], spec.warmup, spec.iterations, LR_FINAL_FACTOR, step)
        refuse_resume_with_nothing_to_do(spec.max_minutes, step, spec.iterations, elapsed)
        metrics.truncate_after(step)
    with (
        cleared_on_failure(out, state_path) if not resume else contextlib.nullcontext()
    ):  # a failed start leaves no half-made prior
        output_folder(out)
        output_folder(out / "samples")
        commands = [" ".join(shlex.quote(a) for a in (command or sys.argv))]
        if resume and (out / "config.json").exists():  # keep the commands of the earlier legs of a resumed run
            commands = read_json(out / "config.json").get("training", {}).get("commands", []) + commands
        write_json(spec.model_dump(mode="json"), out / "spec.json")

        def save(val_loss: float | None) -> None:
            extra = {
                "commands": commands,
                "steps": step,
                "seconds": round(elapsed, 1),
                "val_dsm_loss": val_loss,
                "ema_decay": spec.ema_decay,
            }
            save_weights(ema.module.state_dict(), out / "model.safetensors")
            write_json(prior_config(spec, name, gaussian, extra), out / "config.json")
            save_state(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "data_rng": data_gen.get_state(),
                    "rng": rng_state(),
                    "step": step,
                    "seconds": elapsed,
                },
                state_path,
            )

        def sample_grid() -> None:
            prior = UNetPrior(ema.module, sde, (spec.channels, spec.image_size, spec.image_size), name, {}, gaussian)
            g = torch.Generator(device=device).manual_seed(1234)
            noise = GeneratorNoise(g)
            x = noise((16, spec.channels, spec.image_size, spec.image_size), device)
            x = sample_reverse_sde(prior.score, sde, x, reverse_time_grid(spec.sample_steps), noise, denoise_final=True)
            save_image(image_grid([x[:8], x[8:]]), out / "samples" / f"step_{step:07d}.png")
            ema.module.requires_grad_(False)

        last_val: float | None = None
        deadline = None if spec.max_minutes is None else time.perf_counter() + spec.max_minutes * 60 - elapsed
        model.train()
        with (
            GracefulInterrupt() as interrupt,
            TrainingProgress("pretrain", spec.iterations, step, quiet, ["loss", "val", "lr"]) as progress,
        ):
            while step < spec.iterations:
                t0 = time.perf_counter()
                idx = torch.randint(len(train), (spec.batch_size,), generator=data_gen)
                x0 = train.batch(idx.tolist()).to(device)
                t = torch.rand(spec.batch_size, device=device) * (1 - T_EPS) + T_EPS
                z = torch.randn_like(x0)
                loss = dsm_loss(score_fn, sde, x0, t, z)
                lr = schedule.get_last_lr()[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
                optimizer.step()
                schedule.step()
                ema.update_parameters(model)
                step += 1
                elapsed += time.perf_counter() - t0
                record: dict[str, Any] = {
                    "step": step,
                    "loss": loss.item(),
                    "grad_norm": float(grad_norm),
                    "lr": lr,
                    "seconds": round(elapsed, 3),
                }
                stop = (
                    interrupt.requested
                    or (deadline is not None and time.perf_counter() > deadline)
                    or step == spec.iterations
                )
                if step % spec.sample_every == 0 or stop:
                    model.eval()
                    last_val = val.loss(ema_score_fn, sde, device)
                    record["val_loss_ema"] = last_val
                    record["val_loss_raw"] = val.loss(score_fn, sde, device)
                    sample_grid()
                    model.train()
                metrics.append(record)
                progress.update(step, {"loss": record["loss"], "val": last_val or float("nan"), "lr": record["lr"]})
                if step % spec.checkpoint_every == 0 or stop:
                    save(last_val)
                if stop:
                    break
        if interrupt.requested:
            progress.log(f"interrupted at step {step}: checkpoint saved in {out} (continue with --resume)")
        return {
            "out": str(out),
            "steps": step,
            "seconds": round(elapsed, 1),
            "val_dsm_loss": last_val,
            "interrupted": interrupt.requested,
        }
