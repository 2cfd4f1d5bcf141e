"""Pieces shared by the training loops (``pretrain``, ``finetune``): schedule, interruption, metrics log, progress."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.optim.lr_scheduler import LambdaLR

from .checkpoint import write_checkpoint_file
from .errors import DeftError


def warmup_cosine_factor(step: int, warmup: int, total: int, final_factor: float) -> float:
    """Learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then cosine from 1 to ``final_factor``
    at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    learning_rates: Sequence[float],
    warmup: int,
    total: int,
    final_factor: float,
    step: int = 0,
) -> LambdaLR:
    """Parameter group i learns at ``learning_rates[i]`` × :func:`warmup_cosine_factor` from ``step`` on. The
    schedule is a pure function of the step: a resumed run builds it at its step, after loading the optimizer's
    state, with the resumed leg's rates and iterations."""
    for group, lr in zip(optimizer.param_groups, learning_rates, strict=True):
        group["initial_lr"] = lr
    return LambdaLR(optimizer, lambda n: warmup_cosine_factor(n, warmup, total, final_factor), last_epoch=step - 1)


def refuse_resume_with_nothing_to_do(max_minutes: float | None, step: int, iterations: int, seconds: float) -> None:
    """A resume that could train no step is a user error, raised before anything is written: ``--iterations``
    not above the steps already done, or a ``--max-minutes`` (counted over every leg) already spent."""
    if iterations <= step:
        raise DeftError(
            f"--iterations {iterations}: this run has already trained {step} steps; give more to continue it"
        )
    if max_minutes is not None and max_minutes * 60 <= seconds:
        raise DeftError(
            f"--max-minutes {max_minutes:g} is already spent: this run has trained {seconds / 60:.1f} minutes "
            "(the budget counts every leg of a resumed run); give a larger one"
        )


def refuse_changes(subject: str, changes: dict[str, tuple[Any, Any]], advice: str) -> None:
    """A one-line error for the first ``name: (before, after)`` pair that differs: what ``--resume`` may not change."""
    for name, (before, after) in changes.items():
        if before != after:
            shown = [
                value.model_dump(mode="json") if hasattr(value, "model_dump") else value for value in (before, after)
            ]
            raise DeftError(f"--resume cannot change the {subject}'s {name} ({shown[0]} → {shown[1]}); {advice}")


@contextmanager
def cleared_on_failure(
    folder: Path, first_checkpoint: Path, keep: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """A new output folder (absent or empty before) is emptied again, and removed if it was absent, when
    the command fails before ``first_checkpoint`` exists: a failed start leaves no half-made run that would
    block the next attempt (or be taken for the latest run). Exceptions in ``keep`` leave it as it is."""
    existed = folder.exists()
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, keep) and not first_checkpoint.exists() and folder.is_dir():
            for child in folder.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            if not existed:
                folder.rmdir()
        raise


class MetricsLog:
    """Appends one JSON object per line; each line is flushed, so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run repeats them from its checkpoint)."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        text = "".join(line + "\n" for line in kept)
        write_checkpoint_file(self.path, lambda tmp: Path(tmp).write_text(text))  # a kill meanwhile keeps every line


class TrainingProgress:
    """A rich progress bar with live metrics, or (``quiet``) a plain log line every ``log_every`` steps."""

    def __init__(
        self, description: str, total: int, start: int, quiet: bool, fields: list[str], log_every: int = 10
    ) -> None:
        self.quiet, self.fields, self.log_every, self.total = quiet, fields, log_every, total
        self.console = Console(stderr=True)
        self._start_time = time.perf_counter()
        self._start_step = start
        self._progress: Progress | None = None
        if not quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, metrics="", rate="")
        self.description = description

    def __enter__(self) -> "TrainingProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k} {_fmt(metrics[k])}" for k in self.fields if k in metrics)
        elapsed = time.perf_counter() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        if self._progress is not None:
            self._progress.update(self._task, completed=step, metrics=shown, rate=f"{rate:.2f} it/s")
        elif step % self.log_every == 0 or step == self.total:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(
                f"{self.description} {step}/{self.total} {shown} {rate:.2f} it/s eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"
