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
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import load_state, rng_state, save_state, set_rng_state
from .data import Batch, MeasurementSource
from .devices import Runtime, resolve_device
from .distributed import Distributed, setup, teardown
from .errors import DeftError
from .htransform import GaussianGuidance, HTransform, build_htransform, save_htransform
from .images import image_grid, output_folder, read_measurement, save_image, upsample_to
from .interrupts import GracefulInterrupt
from .operators import Operator
from .priors import Prior, load_prior, state_dict_mismatch
from .runs import (
    HNET_CHECKPOINT,
    RESUME_STATE,
    command_line,
    read_run_record,
    record_resumed_leg,
    refuse_other_prior,
    resolve_run_dir,
    run_operator,
    started_now,
    versions,
    write_run_info,
)
from .samplers import SharedBatchNoise
from .sde import reverse_time_grid
from .soc import (
    Rollout,
    accumulate_vargrad_gradient,
    backprop_soc_gradient,
    data_term,
    gradient_steps,
    rollout,
    vargrad_weights,
)
from .specs import FinetuneSpec, read_saved_spec
from .training import (
    MetricsLog,
    TrainingProgress,
    cleared_on_failure,
    refuse_changes,
    refuse_resume_with_nothing_to_do,
    warmup_cosine_schedule,
)
from .tuning import filled, run_record, spec_value, unset_fields, with_tuned_defaults

J_SMOOTHING = 0.9  # best checkpoint by an exponential moving average of J (one batch of J is noisy)
SCHEDULE_BEFORE_OPTIMIZER = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
"""torch's warning when a schedule steps while its optimizer never has: after a skipped first step, as intended."""


class TrainingDiverged(DeftError):
    """Too many consecutive skipped steps: the run stops, its last good checkpoint intact."""

    exit_code = 1


def htransform_for(spec: FinetuneSpec, prior: Prior, operator: Operator) -> HTransform:
    """The h-network that ``spec`` (resolved: :func:`~deftcli.tuning.with_tuned_defaults`) fine-tunes for this prior
    and operator: the time embedding's period of the prior's UNet, a size relative to the prior's, and its start
    c_0 (``hnet.start``; the zero start where σ_y = 0) for the likelihood with σ_y/√w."""
    prior_unet = getattr(prior, "unet", None)
    max_period = prior_unet.config.max_period if prior_unet is not None else 0.005
    guidance, weight = None, spec.weight()
    if spec.hnet.start == "gaussian" and operator.sigma > 0:
        guidance = GaussianGuidance(
            sigma_y=operator.sigma / math.sqrt(weight),
            gram_norm=operator.gram_norm(prior.image_shape),
            data_variance=prior.pixel_variance(),
        )
    prior_parameters = sum(p.numel() for p in prior.parameters())
    return build_htransform(spec.hnet, prior.image_shape, max_period, prior.sde, prior_parameters, guidance, weight)


def default_loss_threshold(measurement_shape: tuple[int, ...], likelihood_weight: float = 1.0) -> float:
    """5e4 · max(1, m/3072) · w: the original's 5e4 was set for m = 3072 measured values (its VarGrad script's
    2× super-resolution of 64×64 RGB); D = w ‖A x − y‖²/(2σ_y²) grows with m and w, so an operator that
    measures more (inpainting or deblurring of larger images) or a sharper likelihood would otherwise have
    every early trajectory dropped."""
    return 5e4 * max(1.0, math.prod(measurement_shape) / 3072) * likelihood_weight


class Finetuner:
    """The training loop; one :meth:`step` per iteration, state saved for exact resume."""

    def __init__(
        self, spec: FinetuneSpec, run_dir: Path, resume: bool, quiet: bool, ctx: Distributed = Distributed()
    ) -> None:
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
        self.htransform = htransform_for(spec, self.prior, self.operator).to(self.device)
        self.runtime.adapt(self.prior, self.htransform)
        # the module that carries gradients: DDP averages them over ranks after the last backward of a step
        self.model: torch.nn.Module = self.htransform
        if ctx.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.htransform, device_ids=device_ids)
        self.learning_rates = [spec.learning_rate(), spec.learning_rate() * spec.time_lr_factor]  # NN_φ, c_ψ
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.htransform.cond_model.parameters(), "lr": self.learning_rates[0]},
                {"params": self.htransform.time_model.parameters(), "lr": self.learning_rates[1]},
            ]
        )
        self.schedule = self._schedule(step=0)
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

    def _schedule(self, step: int) -> torch.optim.lr_scheduler.LambdaLR:
        spec = self.spec
        return warmup_cosine_schedule(
            self.optimizer, self.learning_rates, spec.warmup, spec.iterations, spec.lr_final_factor, step
        )

    def _trajectory_rows(self) -> slice:
        """This rank's trajectories within the global batch (whole measurement groups in amortised mode)."""
        if self.source.per_measurement:
            return self.ctx.rows(self.spec.trajectories, "--trajectories")
        m = self.ctx.rows(self.spec.measurements_per_batch, "--measurements-per-batch")
        k = self.spec.trajectories
        return slice(m.start * k, m.stop * k)

    def run_info(self, command: list[str] | None) -> dict[str, Any]:
        """What ``run.json`` records of a new run: the prior, the operator, the h-network, the setup, the command."""
        spec = self.spec
        return {
            "prior": self.prior.identity(),
            "operator": {
                "name": spec.operator.name,
                "params": self.operator.params.model_dump(mode="json"),
                "describe": self.operator.describe(),
            },
            "htransform": self.htransform.describe(),
            "mode": "per-measurement" if self.source.per_measurement else "amortised",
            "versions": versions(),
            "seed": spec.seed,
            "device": str(self.device),
            "runtime": self.runtime.describe(),
            "processes": self.ctx.world_size,
            "global_batch": self.global_batch,
            "random_streams": "data/gradient steps: seed, noise: seed + 1; "
            "drawn for the global batch, each process keeps its rows",
            "command": command_line(command),
            "started": started_now(),
            "tuned_defaults": run_record(self.prior.tuning, spec.operator.name, self.tuned_fields),
        }

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
        path = self.run_dir / RESUME_STATE
        state = load_state(path)
        problem = state_dict_mismatch(self.htransform, state.get("htransform", {}))
        if problem:
            raise DeftError(f"{path}: does not match this run's h-network ({problem})")
        try:
            self.htransform.load_state_dict(state["htransform"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise DeftError(f"{path}: does not match this run's spec ({' '.join(str(exc).split())[:200]})") from None
        self.data_gen.set_state(state["data_rng"])
        self.noise_gen.set_state(state["noise_rng"])
        set_rng_state(state["rng"])
        self.step_count, self.seconds = int(state["step"]), float(state["seconds"])
        self.schedule = self._schedule(self.step_count)
        refuse_resume_with_nothing_to_do(self.spec.max_minutes, self.step_count, self.spec.iterations, self.seconds)
        self.skipped_total, self.bad_in_row = int(state["skipped_total"]), int(state["bad_in_row"])
        self.j_smooth, self.best_j = state["j_smooth"], float(state["best_j"])
        self.metrics.truncate_after(self.step_count)

    def save_checkpoint(self) -> None:
        save_state(self._state(), self.run_dir / RESUME_STATE)
        save_htransform(
            self.htransform,
            self.run_dir / HNET_CHECKPOINT,
            {"step": self.step_count, "j_smooth": self.j_smooth},
        )

    def _save_best(self) -> None:
        save_htransform(
            self.htransform,
            self.run_dir / "hnet_best.safetensors",
            {"step": self.step_count, "j_smooth": self.j_smooth},
        )

    # ------------------------------------------------------------ one iteration
    def step(self) -> tuple[dict[str, Any], Batch, Tensor]:
        spec = self.spec
        t0 = time.perf_counter()
        batch = self.source.draw(self.data_gen, self.ctx)
        noise = SharedBatchNoise(self.noise_gen, self.global_batch, self.rows)
        x_init = noise((batch.y.shape[0], *self.prior.image_shape), self.device)
        lr = self.schedule.get_last_lr()[0]
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", re.escape(SCHEDULE_BEFORE_OPTIMIZER))
            self.schedule.step()
        record["lr"] = lr
        self.step_count += 1
        self.seconds += time.perf_counter() - t0
        record.update(
            step=self.step_count, skipped=not grads_ok, skipped_total=self.skipped_total, seconds=round(self.seconds, 3)
        )
        if math.isfinite(record["J"]):
            self.j_smooth = (
                record["J"] if self.j_smooth is None else J_SMOOTHING * self.j_smooth + (1 - J_SMOOTHING) * record["J"]
            )
            record["J_smooth"] = self.j_smooth
        return record, batch, x_final

    def _vargrad_step(self, batch: Batch, x_init: Tensor, noise: SharedBatchNoise) -> tuple[dict[str, Any], Tensor]:
        spec, ctx = self.spec, self.ctx
        steps = gradient_steps(len(self.grid) - 1, spec.grad_fraction, self.data_gen)
        traj: Rollout = rollout(self.prior, self.htransform, self.operator, batch.y, x_init, self.grid, noise, steps)
        d = data_term(self.operator, traj.x_final, batch.y, spec.weight())
        filt = vargrad_weights(
            traj.log_rnd(d),
            batch.groups,
            self.loss_threshold,
            spec.min_kept_fraction,
            ctx.gather_with_grad,
            ctx.gather_values,
        )
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
            self.prior,
            self.model,
            self.operator,
            batch.y,
            x_init,
            self.grid,
            noise,
            spec.micro_batch,
            spec.gradient_checkpointing,
            ctx.no_sync,
            spec.weight(),
        )
        d, kl = ctx.gather_values(d), ctx.gather_values(kl)
        j = float((d + kl).mean())
        finite = math.isfinite(j)
        return {
            "loss": j,
            "J": j,
            "D": float(d.mean()),
            "KL": float(kl.mean()),
            "filtered": 0 if finite else int(d.numel()),
            "skipped": not finite,
        }, x_final

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
            row = [
                upsample_to(self.operator.A_dagger(batch.y_unique[m : m + 1]), shape).cpu(),
                x_final[m * k : (m + 1) * k][:8].cpu(),
            ]
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
            f"finetune {spec.method}",
            spec.iterations,
            self.step_count,
            self.quiet,
            ["loss", "J", "D", "KL", "skipped_total"],
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
                    kept = (
                        "last good checkpoint kept in"
                        if (self.run_dir / RESUME_STATE).exists()
                        else "no checkpoint written yet; metrics in"
                    )
                    raise TrainingDiverged(
                        f"{self.bad_in_row} skipped steps in a row (non-finite or filtered losses); stopped at step "
                        f"{self.step_count}, {kept} {self.run_dir} (try a lower --lr)"
                    )
                timed_out = self.ctx.any(deadline is not None and time.perf_counter() > deadline)
                interrupted = self.ctx.any(interrupt.requested)
                if (self.step_count % spec.checkpoint_every == 0 or last or interrupted or timed_out) and main:
                    self.save_checkpoint()
                if spec.snapshot_every and self.step_count % spec.snapshot_every == 0 and main:
                    save_htransform(
                        self.htransform,
                        self.run_dir / "snapshots" / f"hnet_step_{self.step_count:06d}.safetensors",
                        {"step": self.step_count, "seconds": round(self.seconds, 2)},
                    )
                if interrupted:
                    stopped_by = "interrupt"
                    progress.log(
                        f"interrupted at step {self.step_count}: checkpoint saved in {self.run_dir} "
                        "(continue with --resume)"
                    )
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


def finetune(
    spec: FinetuneSpec, resume: bool = False, quiet: bool = False, command: list[str] | None = None
) -> dict[str, Any]:
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
            cleared = cleared_on_failure(run_dir, run_dir / RESUME_STATE, keep=(TrainingDiverged,))
            with cleared if fresh else contextlib.nullcontext():
                if ctx.is_main:
                    if resume:
                        record_resumed_leg(run_dir, trainer.spec, trainer.step_count, command)
                    else:
                        output_folder(run_dir)
                        measurement = None if trainer.source.fixed is None else trainer.source.fixed[0]
                        write_run_info(run_dir, trainer.spec, trainer.operator, trainer.run_info(command), measurement)
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
    refuse_changes(
        "run",
        {
            "operator": (saved.operator, resumed.operator),
            "dataset": (saved.data.dataset, resumed.data.dataset),
            "mode": tuple("amortised" if s.measurement is None else "per-measurement" for s in (saved, resumed)),
            "h-network": (saved.hnet, resumed.hnet),
            "likelihood weight": (saved.likelihood_weight, resumed.likelihood_weight),
        },
        "start a new run for a different problem",
    )
    kept = run_dir / "measurement.safetensors"
    if (
        resumed.measurement is not None
        and kept.exists()
        and not torch.equal(read_measurement(resumed.measurement), read_measurement(kept))
    ):
        raise DeftError(
            "--resume cannot change the run's measurement "
            f"({resumed.measurement} differs from the {kept} it was fine-tuned for)"
        )
    return resumed
