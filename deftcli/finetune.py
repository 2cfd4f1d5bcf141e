"""``deft finetune``: online SOC fine-tuning of an h-transform (VarGrad or backprop), with a run folder.

Run folder (``runs/<operator>-<timestamp>/`` by default):

- ``spec.json`` the resolved run spec; ``run.json`` the prior's identity, the operator, the
  h-network's config and size, versions, seeds;
- ``hnet_last.safetensors`` / ``hnet_best.safetensors`` the h-network (best by a smoothed J), and
  ``snapshots/hnet_step_*.safetensors`` with ``snapshot_every``;
- ``state_last.safetensors`` everything ``--resume`` needs (weights, optimizer, RNG);
- ``metrics.jsonl`` one line per step; ``preview.png`` measurements, current samples, ground truth;
- ``measurement.safetensors`` the measurement, in per-measurement mode.

All files are written atomically, so an interrupted or killed run keeps its last good checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .checkpoint import file_sha256, load_state, rng_state, save_state, set_rng_state, write_json
from .data import ImageDataset, open_dataset
from .devices import Runtime, resolve_device
from .distributed import Distributed, setup, teardown
from .errors import DeftError
from .gmm import GaussianMixturePrior
from .htransform import GaussianGuidance, HTransform, HTransformConfig, save_htransform
from .images import image_grid, output_folder, read_measurement, save_image, upsample_to
from .operators import Operator
from .priors import Prior, load_prior, state_dict_mismatch
from .tuning import filled, run_record, spec_value, unset_fields, with_tuned_defaults
from .runs import keep_operator_files, latest_run, read_run_record, refuse_other_prior, run_operator
from .samplers import SharedBatchNoise
from .sde import reverse_time_grid
from .soc import Rollout, accumulate_vargrad_gradient, backprop_soc_gradient, data_term, gradient_steps, rollout, vargrad_weights
from .specs import FinetuneSpec, HNetSpec, read_saved_spec
from .training import (
    GracefulInterrupt,
    MetricsLog,
    TrainingProgress,
    cleared_on_failure,
    load_optimizer_state,
    refuse_changes,
    refuse_resume_with_nothing_to_do,
    scale_learning_rates,
    warmup_cosine_factor,
)
from .unet import UNetConfig

J_SMOOTHING = 0.9  # best checkpoint by an exponential moving average of J (one batch of J is noisy)


class TrainingDiverged(DeftError):
    """Too many consecutive skipped steps: the run stops, its last good checkpoint intact."""

    exit_code = 1


@dataclass
class Batch:
    """One training batch: M measurements, each repeated for its K trajectories."""

    y: Tensor  # (M·K, *measurement_shape)
    groups: Tensor  # (M·K,) measurement index of each trajectory
    y_unique: Tensor  # (M, ...)
    x_true: Tensor | None  # (M, C, H, W) ground truth when known


class MeasurementSource:
    """Amortised: fresh train images and noise each step; per-measurement: the one given y."""

    def __init__(self, spec: FinetuneSpec, prior: Prior, operator: Operator, device: torch.device) -> None:
        self.spec, self.operator, self.device = spec, operator, device
        self.expected = operator.measurement_shape(prior.image_shape)
        self.fixed: Tensor | None = None
        self.dataset: ImageDataset | None = None
        if spec.measurement is not None:
            y = read_measurement(spec.measurement)
            check_measurement_shape(y, self.expected, prior.image_shape, spec.measurement, operator)
            self.fixed = y[None].to(device)
        elif isinstance(prior, GaussianMixturePrior):  # an analytic prior's "train split" is its own samples
            self.dataset = prior.dataset("train")
        else:
            self.dataset = open_dataset(spec.data, "train", prior.image_shape[-1], prior.image_shape[0])

    @property
    def per_measurement(self) -> bool:
        return self.fixed is not None

    def global_batch(self) -> int:
        """Trajectories per step over all processes: M·K amortised, K per measurement."""
        return self.spec.trajectories * (1 if self.fixed is not None else self.spec.measurements_per_batch)

    def draw(self, data_gen: torch.Generator, ctx: Distributed) -> Batch:
        """This rank's share of the global batch of M measurements × K trajectories.

        Image indices and measurement noise are drawn for the whole global batch from ``data_gen``
        (identical on every rank); each rank renders and keeps only its measurements.
        """
        k = self.spec.trajectories
        if self.fixed is not None:
            rows = ctx.rows(k, "--trajectories")
            n = rows.stop - rows.start
            return Batch(self.fixed.expand(n, *self.fixed.shape[1:]), torch.zeros(n, dtype=torch.long, device=self.device), self.fixed, None)
        assert self.dataset is not None
        m = self.spec.measurements_per_batch
        rows = ctx.rows(m, "--measurements-per-batch")
        idx = torch.randint(len(self.dataset), (m,), generator=data_gen)
        noise = torch.randn((m, *self.expected), generator=data_gen)
        x_true = self.dataset.batch(idx[rows].tolist())
        y = (self.operator.A(x_true) + self.operator.sigma * noise[rows]).to(self.device)
        groups = torch.arange(m, device=self.device)[rows].repeat_interleave(k)
        return Batch(y.repeat_interleave(k, dim=0), groups, y, x_true)


def check_measurement_shape(y: Tensor, expected: tuple[int, ...], image_shape: tuple[int, ...], where: Any, operator: Operator) -> None:
    """A measurement must have the shape the operator produces for the prior's images."""
    if tuple(y.shape) != tuple(expected):
        kind = "channels" if y.shape[0] != expected[0] else "size"
        raise DeftError(
            f"{where}: measurement has shape {tuple(y.shape)} but {operator.describe()} of the prior's "
            f"{tuple(image_shape)} images gives {tuple(expected)} (wrong {kind})"
        )


def default_run_dir(operator_name: str) -> Path:
    return Path("runs") / f"{operator_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def build_htransform(spec: FinetuneSpec, prior: Prior, operator: Operator) -> HTransform:
    """The h-network for this prior and operator: its time embedding's period, a size relative to the
    prior's, and its start c_0 (``hnet.start``; the zero start where σ_y = 0)."""
    prior_unet = getattr(prior, "unet", None)
    max_period = prior_unet.config.max_period if prior_unet is not None else 0.005
    spec, _ = with_tuned_defaults(spec, prior.tuning)  # a spec straight from the caller may leave them unset
    hnet = spec.hnet
    r, (_, height, width) = hnet.space_to_depth, prior.image_shape
    if hnet.architecture == "unet" and (height % r or width % r):
        raise DeftError(f"hnet.space_to_depth {r} must divide the prior's image size {height}×{width}")
    if hnet.architecture == "unet":
        UNetConfig(channel_mult=hnet.channel_mult).check_image_size(
            height // r, width // r, f"--hnet-mult: the h-network's input (the prior's {height}×{width} images on {r}×{r} blocks)")
    if hnet.model_channels is None:
        hnet = hnet.model_copy(update={"model_channels": auto_channels(hnet, prior)})
    guidance, weight = None, spec.weight()
    if hnet.start == "gaussian" and operator.sigma > 0:
        guidance = GaussianGuidance(sigma_y=operator.sigma / math.sqrt(weight), gram_norm=operator.gram_norm(prior.image_shape),
                                    data_variance=prior.pixel_variance())
    return HTransform(HTransformConfig.from_spec(hnet, tuple(prior.image_shape), max_period, guidance, weight), prior.sde)


def auto_channels(hnet: HNetSpec, prior: Prior) -> int:
    """The largest multiple of 4 channels whose h-network has at most ``size_fraction`` of the prior's parameters
    (the paper's h-networks are 4–9 % of their priors); 16 for a prior without parameters (analytic)."""
    budget = hnet.size_fraction * sum(p.numel() for p in prior.parameters())
    if budget == 0:
        return 16
    best = 4
    for channels in range(4, 257, 4):
        config = HTransformConfig.from_spec(hnet.model_copy(update={"model_channels": channels}), tuple(prior.image_shape), 0.005)
        if sum(p.numel() for p in HTransform(config, prior.sde).parameters()) > budget:
            break
        best = channels
    return best


def default_loss_threshold(measurement_shape: tuple[int, ...], likelihood_weight: float = 1.0) -> float:
    """5e4 · max(1, m/3072) · w: the original's 5e4 was set for m = 3072 measured values (its VarGrad script's
    2× super-resolution of 64×64 RGB); D = w ‖A x − y‖²/(2σ_y²) grows with m and w, so an operator that
    measures more (inpainting or deblurring of larger images) or a sharper likelihood would otherwise have
    every early trajectory dropped."""
    return 5e4 * max(1.0, math.prod(measurement_shape) / 3072) * likelihood_weight


def versions() -> dict[str, str]:
    return {"deft": __version__, "torch": torch.__version__, "python": platform.python_version()}


class Finetuner:
    """The training loop; one :meth:`step` per iteration, state saved for exact resume."""

    def __init__(self, spec: FinetuneSpec, run_dir: Path, resume: bool, quiet: bool, ctx: Distributed = Distributed()) -> None:
        self.spec, self.run_dir, self.quiet, self.ctx = spec, run_dir, quiet or not ctx.is_main, ctx
        self.device = ctx.device(resolve_device(spec.device))
        self.runtime = Runtime.resolve(self.device, spec.precision, spec.compile)
        self.prior = load_prior(spec.prior.path).to(self.device)
        spec, self.tuned_fields = with_tuned_defaults(spec, self.prior.tuning)
        self.spec = spec
        if resume:  # before the state is read or anything written
            refuse_other_prior(run_dir, read_run_record(run_dir), self.prior)
        self.operator = run_operator(spec, run_dir)
        if self.operator.sigma <= 0:
            raise DeftError("fine-tuning needs measurement noise --sigma > 0 (the data term is ‖A x − y‖²/(2 σ_y²))")
        self.source = MeasurementSource(spec, self.prior, self.operator, self.device)
        torch.manual_seed(spec.seed)
        self.htransform = build_htransform(spec, self.prior, self.operator).to(self.device)
        self.runtime.adapt(self.prior, self.htransform)
        # the module that carries gradients: DDP averages them over ranks after the last backward of a step
        self.model: torch.nn.Module = self.htransform
        if ctx.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.htransform, device_ids=device_ids)
        self.lr = spec.learning_rate()
        self.optimizer = torch.optim.Adam(
            [{"params": self.htransform.cond_model.parameters(), "lr": self.lr, "base_lr": self.lr},
             {"params": self.htransform.time_model.parameters(), "lr": self.lr * spec.time_lr_factor, "base_lr": self.lr * spec.time_lr_factor}]
        )
        self.data_gen = torch.Generator().manual_seed(spec.seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(spec.seed + 1)
        self.grid = reverse_time_grid(spec.time_steps)
        self.global_batch = self.source.global_batch()
        self.loss_threshold = spec.loss_threshold or default_loss_threshold(self.source.expected, spec.weight())
        self.rows = self._trajectory_rows()
        self.step_count, self.seconds, self.skipped_total, self.bad_in_row = 0, 0.0, 0, 0
        self.j_smooth: float | None = None
        self.best_j = math.inf
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        if resume:
            self._load_state()

    def _trajectory_rows(self) -> slice:
        """This rank's trajectories within the global batch (whole measurement groups in amortised mode)."""
        if self.source.per_measurement:
            return self.ctx.rows(self.spec.trajectories, "--trajectories")
        m = self.ctx.rows(self.spec.measurements_per_batch, "--measurements-per-batch")
        k = self.spec.trajectories
        return slice(m.start * k, m.stop * k)

    # ------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "htransform": self.htransform.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.data_gen.get_state(),
            "noise_rng": self.noise_gen.get_state(),
            "rng": rng_state(),
            "step": self.step_count,
            "seconds": self.seconds,
            "skipped_total": self.skipped_total,
            "bad_in_row": self.bad_in_row,
            "j_smooth": self.j_smooth,
            "best_j": self.best_j,
        }

    def _load_state(self) -> None:
        path = self.run_dir / "state_last.safetensors"
        state = load_state(path)
        problem = state_dict_mismatch(self.htransform, state.get("htransform", {}))
        if problem:
            raise DeftError(f"{path}: does not match this run's h-network ({problem})")
        try:
            self.htransform.load_state_dict(state["htransform"])
            load_optimizer_state(self.optimizer, state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise DeftError(f"{path}: does not match this run's spec ({' '.join(str(exc).split())[:200]})") from None
        self.data_gen.set_state(state["data_rng"])
        self.noise_gen.set_state(state["noise_rng"])
        set_rng_state(state["rng"])
        self.step_count, self.seconds = int(state["step"]), float(state["seconds"])
        refuse_resume_with_nothing_to_do(self.spec.max_minutes, self.step_count, self.spec.iterations, self.seconds)
        self.skipped_total, self.bad_in_row = int(state["skipped_total"]), int(state["bad_in_row"])
        self.j_smooth, self.best_j = state["j_smooth"], float(state["best_j"])
        self.metrics.truncate_after(self.step_count)

    def save_checkpoint(self) -> None:
        save_state(self._state(), self.run_dir / "state_last.safetensors")
        save_htransform(self.htransform, self.run_dir / "hnet_last.safetensors", {"step": self.step_count, "j_smooth": self.j_smooth})

    def _save_best(self) -> None:
        save_htransform(self.htransform, self.run_dir / "hnet_best.safetensors", {"step": self.step_count, "j_smooth": self.j_smooth})

    # ------------------------------------------------------------ one iteration
    def step(self) -> tuple[dict[str, Any], Batch, Tensor]:
        spec = self.spec
        t0 = time.perf_counter()
        batch = self.source.draw(self.data_gen, self.ctx)
        noise = SharedBatchNoise(self.noise_gen, self.global_batch, self.rows)
        x_init = noise((batch.y.shape[0], *self.prior.image_shape), self.device)
        factor = warmup_cosine_factor(self.step_count, spec.warmup, spec.iterations, spec.lr_final_factor)
        scale_learning_rates(self.optimizer, factor)
        lr = self.lr * factor
        self.optimizer.zero_grad(set_to_none=True)
        if spec.method == "vargrad":
            record, x_final = self._vargrad_step(batch, x_init, noise)
        else:
            record, x_final = self._backprop_step(batch, x_init, noise)
        grads_ok = not record["skipped"] and self._clip_and_check()
        if grads_ok:
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            self.skipped_total += 1
            self.bad_in_row += 1
        record["lr"] = lr
        self.step_count += 1
        self.seconds += time.perf_counter() - t0
        record.update(step=self.step_count, skipped=not grads_ok, skipped_total=self.skipped_total, seconds=round(self.seconds, 3))
        if math.isfinite(record["J"]):
            self.j_smooth = record["J"] if self.j_smooth is None else J_SMOOTHING * self.j_smooth + (1 - J_SMOOTHING) * record["J"]
            record["J_smooth"] = self.j_smooth
        return record, batch, x_final

    def _vargrad_step(self, batch: Batch, x_init: Tensor, noise: SharedBatchNoise) -> tuple[dict[str, Any], Tensor]:
        spec, ctx = self.spec, self.ctx
        steps = gradient_steps(len(self.grid) - 1, spec.grad_fraction, self.data_gen)
        traj: Rollout = rollout(self.prior, self.htransform, self.operator, batch.y, x_init, self.grid, noise, steps)
        d = data_term(self.operator, traj.x_final, batch.y, spec.weight())
        filt = vargrad_weights(traj.log_rnd(d), batch.groups, self.loss_threshold, spec.min_kept_fraction, ctx.gather_with_grad, ctx.gather_values)
        if not filt.skipped:
            accumulate_vargrad_gradient(self.model, self.prior, self.grid, traj.stored, filt.weights, ctx.no_sync)
        d_all, t1_all, kept = ctx.gather_values(d), ctx.gather_values(traj.t1), filt.kept
        record = {
            "loss": float(filt.loss),
            "J": float((d_all - t1_all)[kept].mean()) if kept.any() else math.nan,
            "D": float(d_all[kept].mean()) if kept.any() else math.nan,
            "KL": float(-t1_all[kept].mean()) if kept.any() else math.nan,
            "filtered": int((~kept).sum()),
            "skipped": filt.skipped,
        }
        return record, traj.x_final

    def _backprop_step(self, batch: Batch, x_init: Tensor, noise: SharedBatchNoise) -> tuple[dict[str, Any], Tensor]:
        spec, ctx = self.spec, self.ctx
        d, kl, x_final = backprop_soc_gradient(
            self.prior, self.model, self.operator, batch.y, x_init, self.grid, noise, spec.micro_batch, spec.gradient_checkpointing, ctx.no_sync,
            spec.weight(),
        )
        d, kl = ctx.gather_values(d), ctx.gather_values(kl)
        j = float((d + kl).mean())
        finite = math.isfinite(j)
        return {"loss": j, "J": j, "D": float(d.mean()), "KL": float(kl.mean()), "filtered": 0 if finite else int(d.numel()), "skipped": not finite}, x_final

    def _clip_and_check(self) -> bool:
        """Clip each network's gradient norm separately (as the original); reject non-finite gradients."""
        norms = [
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.spec.grad_clip)
            for module in (self.htransform.cond_model, self.htransform.time_model)
        ]
        return all(bool(torch.isfinite(n)) for n in norms)

    # ------------------------------------------------------------ outputs
    def preview(self, batch: Batch, x_final: Tensor) -> None:
        k = self.spec.trajectories
        shape = tuple(self.prior.image_shape[-2:])
        rows = []
        for m in range(min(batch.y_unique.shape[0], 4)):
            row = [upsample_to(self.operator.A_dagger(batch.y_unique[m : m + 1]), shape).cpu(), x_final[m * k : (m + 1) * k][:8].cpu()]
            if batch.x_true is not None:
                row.append(batch.x_true[m : m + 1].cpu())
            rows.append(torch.cat(row))
        save_image(image_grid(rows), self.run_dir / "preview.png")

    def time_scale_values(self) -> dict[str, float]:
        t = torch.tensor([0.1, 0.5, 0.9], device=self.device)
        with torch.no_grad():
            c = self.htransform.time_model(t).flatten().tolist()
        return {f"c_t{v}": round(c_i, 6) for v, c_i in zip((0.1, 0.5, 0.9), c)}

    def run(self, interrupt: GracefulInterrupt) -> dict[str, Any]:
        """Train up to ``spec.iterations``; a signal that ``interrupt`` caught (even before this was called)
        stops the run after the current step, with a checkpoint."""
        spec = self.spec
        deadline = None if spec.max_minutes is None else time.perf_counter() + spec.max_minutes * 60 - self.seconds
        stopped_by = "iterations"
        with TrainingProgress(
            f"finetune {spec.method}", spec.iterations, self.step_count, self.quiet, ["loss", "J", "D", "KL", "skipped_total"]
        ) as progress:
            while self.step_count < spec.iterations:
                record, batch, x_final = self.step()
                last = self.step_count == spec.iterations
                main = self.ctx.is_main
                if self.step_count % spec.preview_every == 0 or last:
                    record.update(self.time_scale_values())
                    if main:
                        self.preview(batch, x_final)
                if main:
                    self.metrics.append(record)
                progress.update(self.step_count, record)
                if self.j_smooth is not None and self.j_smooth < self.best_j and not record["skipped"]:
                    self.best_j = self.j_smooth
                    if main:
                        self._save_best()
                if self.bad_in_row >= spec.max_bad_steps:
                    kept = "last good checkpoint kept in" if (self.run_dir / "state_last.safetensors").exists() else "no checkpoint written yet; metrics in"
                    raise TrainingDiverged(
                        f"{self.bad_in_row} skipped steps in a row (non-finite or filtered losses); stopped at step "
                        f"{self.step_count}, {kept} {self.run_dir} (try a lower --lr)"
                    )
                timed_out = self.ctx.any(deadline is not None and time.perf_counter() > deadline)
                interrupted = self.ctx.any(interrupt.requested)
                if (self.step_count % spec.checkpoint_every == 0 or last or interrupted or timed_out) and main:
                    self.save_checkpoint()
                if spec.snapshot_every and self.step_count % spec.snapshot_every == 0 and main:
                    save_htransform(self.htransform, self.run_dir / "snapshots" / f"hnet_step_{self.step_count:06d}.safetensors",
                                    {"step": self.step_count, "seconds": round(self.seconds, 2)})
                if interrupted:
                    stopped_by = "interrupt"
                    progress.log(f"interrupted at step {self.step_count}: checkpoint saved in {self.run_dir} (continue with --resume)")
                    break
                if timed_out:
                    stopped_by = "max_minutes"
                    break
        if self.ctx.is_main and not (self.run_dir / "hnet_best.safetensors").exists():
            self._save_best()
        self.ctx.barrier()
        return {
            "run_dir": str(self.run_dir),
            "steps": self.step_count,
            "seconds": round(self.seconds, 1),
            "skipped_steps": self.skipped_total,
            "J_smooth": self.j_smooth,
            "stopped_by": stopped_by,
            "processes": self.ctx.world_size,
        }


def resolve_run_dir(spec: FinetuneSpec, resume: bool) -> Path:
    """The run folder: an existing run to resume, or a new path that holds nothing yet (not created here)."""
    if resume:
        run_dir = Path(spec.run_dir) if spec.run_dir else latest_run()
        if not (run_dir / "state_last.safetensors").exists():
            raise DeftError(f"{run_dir}: nothing to resume (no state_last.safetensors)")
        for stale in run_dir.glob(".*.tmp"):  # a write that a killed process left unfinished
            stale.unlink()
        return run_dir
    run_dir = Path(spec.run_dir) if spec.run_dir else default_run_dir(spec.operator.name)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise DeftError(f"{run_dir}: run folder exists and is not empty (use --resume to continue it, or another --run-dir)")
    if run_dir.exists() and not run_dir.is_dir():
        raise DeftError(f"{run_dir}: exists and is not a folder (choose another --run-dir)")
    return run_dir


def finetune(spec: FinetuneSpec, resume: bool = False, quiet: bool = False, command: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune an h-transform as described by ``spec``; returns a summary of the run.

    Under ``torchrun`` every rank calls this; rank 0 prepares the run folder and writes all files.
    SIGINT and SIGTERM are caught from the start: one while the prior, the data or a checkpoint is
    still loading stops the run at its first step, which is saved.
    """
    ctx = setup(resolve_device(spec.device))
    try:
        with GracefulInterrupt() as interrupt:
            run_dir = Path(ctx.broadcast(str(resolve_run_dir(spec, resume)) if ctx.is_main else None))
            if resume:
                spec = spec.model_copy(update={"run_dir": str(run_dir)})
                spec = refuse_problem_change(run_dir, spec)
            trainer = Finetuner(spec, run_dir, resume, quiet, ctx)  # checks prior, operator, measurement first
            fresh = not resume and ctx.is_main
            cleared = cleared_on_failure(run_dir, run_dir / "state_last.safetensors", keep=(TrainingDiverged,))
            with cleared if fresh else contextlib.nullcontext():
                if ctx.is_main:
                    if resume:
                        record_resumed_leg(trainer, run_dir, command)
                    else:
                        output_folder(run_dir)
                        write_run_info(trainer, run_dir, command)
                ctx.barrier()
                return trainer.run(interrupt)
    finally:
        teardown(ctx)


def refuse_problem_change(run_dir: Path, resumed: FinetuneSpec) -> FinetuneSpec:
    """A one-line error, before anything is read into training or written, when ``--resume`` would
    change what the run solves or the network it trains.

    A resumed leg may change the schedule (iterations, time budget, learning rate, N, batch size,
    device) and where files are (the data root, the prior's or the measurement's path), not the
    operator, the data set, the mode (amortised or one measurement), the h-network or the measurement
    (the run's ``measurement.safetensors``); the prior's weights are checked by :class:`Finetuner`,
    which loads the prior anyway.
    """
    saved = FinetuneSpec.model_validate(read_saved_spec(run_dir / "spec.json"))
    resumed = filled(resumed, {name: spec_value(saved, name) for name in unset_fields(resumed)})
    refuse_changes("run", {
        "operator": (saved.operator, resumed.operator),
        "dataset": (saved.data.dataset, resumed.data.dataset),
        "mode": tuple("amortised" if s.measurement is None else "per-measurement" for s in (saved, resumed)),
        "h-network": (saved.hnet, resumed.hnet),
        "likelihood weight": (saved.likelihood_weight, resumed.likelihood_weight),
    }, "start a new run for a different problem")
    kept = run_dir / "measurement.safetensors"
    if resumed.measurement is not None and kept.exists() and not torch.equal(read_measurement(resumed.measurement), read_measurement(kept)):
        raise DeftError(f"--resume cannot change the run's measurement ({resumed.measurement} differs from the {kept} it was fine-tuned for)")
    return resumed


def record_resumed_leg(trainer: Finetuner, run_dir: Path, command: list[str] | None) -> None:
    """``spec.json`` becomes the resumed leg's spec; ``run.json`` lists every resumed leg's command."""
    info = read_run_record(run_dir)
    write_json(trainer.spec.model_dump(mode="json"), run_dir / "spec.json")
    info["resumed"] = [*info.get("resumed", []), {"command": " ".join(shlex.quote(a) for a in (command or sys.argv)),
                                                   "started": datetime.now().isoformat(timespec="seconds"), "at_step": trainer.step_count}]
    write_json(info, run_dir / "run.json")


def write_run_info(trainer: Finetuner, run_dir: Path, command: list[str] | None) -> None:
    """``spec.json`` and ``run.json``: what a later reader needs to know exactly what ran."""
    spec = trainer.spec
    write_json(keep_operator_files(spec, trainer.operator, run_dir).model_dump(mode="json"), run_dir / "spec.json")
    run_info = {
        "prior": trainer.prior.identity(),
        "operator": {"name": spec.operator.name, "params": trainer.operator.params.model_dump(mode="json"), "describe": trainer.operator.describe()},
        "htransform": trainer.htransform.describe(),
        "mode": "per-measurement" if trainer.source.per_measurement else "amortised",
        "versions": versions(),
        "seed": spec.seed,
        "device": str(trainer.device),
        "runtime": trainer.runtime.describe(),
        "processes": trainer.ctx.world_size,
        "global_batch": trainer.global_batch,
        "random_streams": "data/gradient steps: seed, noise: seed + 1; drawn for the global batch, each process keeps its rows",
        "command": " ".join(shlex.quote(a) for a in (command or sys.argv)),
        "started": datetime.now().isoformat(timespec="seconds"),
        "tuned_defaults": run_record(trainer.prior.tuning, spec.operator.name, trainer.tuned_fields),
    }
    if trainer.source.fixed is not None:
        save_image(trainer.source.fixed[0], run_dir / "measurement.safetensors")
        run_info["measurement"] = {"source": str(spec.measurement), "sha256": file_sha256(Path(spec.measurement))}
    write_json(run_info, run_dir / "run.json")
