"""Run folders of ``deft finetune``: where a new one goes and what it records (``spec.json``, ``run.json``), and
finding and opening one (for ``--resume``, ``deft sample`` and ``deft eval``)."""

from __future__ import annotations

import platform
import shlex
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import Tensor

from . import __version__
from .checkpoint import file_sha256, read_json, write_json
from .errors import DeftError
from .htransform import HTransform, load_htransform
from .images import atomic_write, save_image
from .operators import Operator, create
from .priors import Prior, load_prior
from .specs import FinetuneSpec, read_saved_spec, validation_message

RUNS_ROOT = Path("runs")


def default_run_dir(operator_name: str) -> Path:
    return RUNS_ROOT / f"{operator_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(spec: FinetuneSpec, resume: bool) -> Path:
    """The run folder: an existing run to resume, or a new path that holds nothing yet (not created here)."""
    if resume:
        run_dir = Path(spec.run_dir) if spec.run_dir else latest_run(holding=RESUME_STATE)
        if not (run_dir / RESUME_STATE).exists():
            raise DeftError(f"{run_dir}: nothing to resume (no {RESUME_STATE})")
        for stale in run_dir.glob(".*.tmp"):  # a write that a killed process left unfinished
            stale.unlink()
        return run_dir
    run_dir = Path(spec.run_dir) if spec.run_dir else default_run_dir(spec.operator.name)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise DeftError(
            f"{run_dir}: run folder exists and is not empty (use --resume to continue it, or another --run-dir)"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise DeftError(f"{run_dir}: exists and is not a folder (choose another --run-dir)")
    return run_dir


def versions() -> dict[str, str]:
    return {"deft": __version__, "torch": torch.__version__, "python": platform.python_version()}


def command_line(command: list[str] | None) -> str:
    """The command that ran (``sys.argv`` unless given), quoted as a shell would need it."""
    return " ".join(shlex.quote(a) for a in (command or sys.argv))


def started_now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def write_run_info(
    run_dir: Path, spec: FinetuneSpec, operator: Operator, record: dict[str, Any], measurement: Tensor | None
) -> None:
    """A new run's ``spec.json`` (naming the run's copies of the operator's files, :func:`keep_operator_files`) and
    ``run.json``, ``record`` (what a later reader needs to know exactly what ran); in per-measurement mode also
    ``measurement.safetensors``, with the source's path and SHA-256 in ``run.json``."""
    write_json(keep_operator_files(spec, operator, run_dir).model_dump(mode="json"), run_dir / "spec.json")
    if measurement is not None:
        save_image(measurement, run_dir / "measurement.safetensors")
        sha256 = file_sha256(Path(spec.measurement))
        record = {**record, "measurement": {"source": str(spec.measurement), "sha256": sha256}}
    write_json(record, run_dir / "run.json")


def record_resumed_leg(run_dir: Path, spec: FinetuneSpec, at_step: int, command: list[str] | None) -> None:
    """``spec.json`` becomes the resumed leg's spec; ``run.json`` lists every resumed leg's command."""
    info = read_run_record(run_dir)
    write_json(spec.model_dump(mode="json"), run_dir / "spec.json")
    leg = {"command": command_line(command), "started": started_now(), "at_step": at_step}
    info["resumed"] = [*info.get("resumed", []), leg]
    write_json(info, run_dir / "run.json")


HNET_CHECKPOINT = "hnet_last.safetensors"
RESUME_STATE = "state_last.safetensors"


def latest_run(root: Path = RUNS_ROOT, holding: str = HNET_CHECKPOINT) -> Path:
    """The most recently started run folder under ``root`` that holds ``holding``: an h-network checkpoint to
    sample with, or (``RESUME_STATE``) the state a resume needs, which a run killed during its first checkpoint
    may have without the other."""
    candidates = (
        [p for p in root.glob("*") if (p / "run.json").exists() and (p / holding).exists()] if root.is_dir() else []
    )
    if not candidates:
        if holding == RESUME_STATE:
            raise DeftError(f"no run to resume under {root}/ (none holds {RESUME_STATE}; pass --run-dir DIR)")
        raise DeftError(f"no fine-tuned run found under {root}/ (run `deft finetune` first, or pass --run DIR)")
    return max(candidates, key=lambda p: (p / "run.json").stat().st_mtime)


@dataclass
class FinetunedRun:
    """A run folder opened for sampling: its spec, the prior, the operator and the h-network."""

    path: Path
    spec: FinetuneSpec
    info: dict[str, Any]
    prior: Prior
    operator: Operator
    htransform: HTransform


def open_run(
    path: str | Path | None,
    device: torch.device,
    checkpoint: Literal["last", "best"] = "last",
    prior_override: str | None = None,
) -> FinetunedRun:
    """Open ``path`` (default: the latest run); the prior must be the one the run was fine-tuned on.

    ``prior_override`` loads it from another place (a moved or copied prior); its weights must still
    have the SHA-256 recorded in ``run.json``.
    """
    run_dir = Path(path) if path is not None else latest_run()
    if not run_dir.exists():
        raise DeftError(f"run '{run_dir}': no such folder")
    if not run_dir.is_dir():
        raise DeftError(f"run '{run_dir}': not a folder (give the run folder that `deft finetune` wrote)")
    try:
        spec = FinetuneSpec.model_validate(read_saved_spec(run_dir / "spec.json"))
    except ValidationError as exc:
        raise DeftError(validation_message(exc, str(run_dir / "spec.json"))) from None
    info = read_run_record(run_dir)
    prior = load_prior(prior_override or spec.prior.path).to(device)
    refuse_other_prior(run_dir, info, prior)
    operator = run_operator(spec, run_dir)
    weights = run_dir / f"hnet_{checkpoint}.safetensors"
    htransform, _ = load_htransform(weights, prior)
    check_htransform_belongs_to_run(htransform, info, prior, weights)
    return FinetunedRun(run_dir, spec, info, prior, operator, htransform.to(device).eval().requires_grad_(False))


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """``run.json``, which must hold the ``prior`` object that ``deft finetune`` wrote (with the SHA-256 of
    the prior's weights, for every prior that has weights)."""
    path = run_dir / "run.json"
    info = read_json(path)
    if not isinstance(info, dict):
        raise DeftError(f"{path}: expected a JSON object, got {type(info).__name__}")
    prior = info.get("prior")
    if not isinstance(prior, dict) or not isinstance(prior.get("sha256", ""), str):
        raise DeftError(f"{path}: not a run record deft wrote (its 'prior' entry is missing or malformed)")
    return info


def refuse_other_prior(run_dir: Path, info: dict[str, Any], prior: Prior) -> None:
    """The prior must have the weights the run was fine-tuned on (the SHA-256 in ``run.json``)."""
    recorded, current = info["prior"].get("sha256"), prior.identity().get("sha256")
    if recorded is not None and recorded != current:
        raise DeftError(
            f"{run_dir}: the prior's weights changed since fine-tuning "
            f"(sha256 {str(current)[:12]}… ≠ recorded {recorded[:12]}…)"
        )


OPERATOR_FILE_PREFIX = "operator-"
"""A run keeps a copy of every file its operator reads (a blur kernel, an inpainting mask) as
``operator-<parameter><suffix>``, and its ``spec.json`` names that copy: the run does not depend on the
folder it is used from, and a file changed after fine-tuning cannot change the operator unseen."""


def keep_operator_files(spec: FinetuneSpec, operator: Operator, run_dir: Path) -> FinetuneSpec:
    """Copy the files ``operator`` (built from ``spec``) reads (:meth:`~deftcli.operators.Operator.parameter_files`)
    into ``run_dir``; the spec naming the copies."""
    params = dict(spec.operator.params)
    for key, source in operator.parameter_files().items():
        kept = f"{OPERATOR_FILE_PREFIX}{key}{source.suffix}"
        atomic_write(run_dir / kept, lambda tmp, source=source: shutil.copyfile(source, tmp))
        params[key] = kept
    return spec.model_copy(update={"operator": spec.operator.model_copy(update={"params": params})})


def run_operator(spec: FinetuneSpec, run_dir: Path) -> Operator:
    """The run's operator, with the files it keeps (:func:`keep_operator_files`) read from ``run_dir``."""
    params = {
        key: str(run_dir / value)
        if isinstance(value, str) and value.startswith(OPERATOR_FILE_PREFIX) and (run_dir / value).is_file()
        else value
        for key, value in spec.operator.params.items()
    }
    return create(spec.operator.name, **params)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): list(obj) if isinstance(obj, tuple) else obj}


def check_htransform_belongs_to_run(htransform: HTransform, info: dict[str, Any], prior: Prior, weights: Path) -> None:
    """The checkpoint must be the h-network this run trained: the architecture recorded in ``run.json``
    (when recorded) and, in any case, the prior's number of channels."""
    found = _flatten(htransform.config.model_dump(mode="json"))
    recorded = info.get("htransform", {}).get("config") if isinstance(info.get("htransform"), dict) else None
    if isinstance(recorded, dict):
        expected = _flatten(recorded)
        differ = [key for key in sorted(set(found) | set(expected)) if found.get(key) != expected.get(key)]
        if differ:
            shown = "; ".join(f"{key} {found.get(key)!r} vs {expected.get(key)!r}" for key in differ[:3])
            raise DeftError(
                f"{weights}: checkpoint does not match this run's h-network (checkpoint vs run.json: {shown}"
                f"{' …' if len(differ) > 3 else ''}); was it copied from another run?"
            )
    channels, height, width = prior.image_shape
    network, blocks = htransform.config.network, htransform.config.space_to_depth**2
    if (network.in_channels, network.out_channels) != (2 * channels * blocks, channels * blocks):
        raise DeftError(
            f"{weights}: checkpoint does not match the prior: "
            f"its h-network takes {network.in_channels // blocks} input channels, "
            f"the prior's {channels}-channel images need {2 * channels}"
        )
    size = getattr(network, "image_size", None)
    if size is not None and tuple(size) != (height, width):
        raise DeftError(
            f"{weights}: checkpoint does not match the prior: "
            f"its h-network is for {tuple(size)} images, the prior's are {(height, width)}"
        )
