"""Finding and opening fine-tuned runs (for ``deft sample`` and ``deft eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from .checkpoint import read_json
from .errors import DeftError
from .htransform import HTransform, load_htransform
from .operators import Operator, create
from .priors import Prior, load_prior
from .specs import FinetuneSpec, validation_message

RUNS_ROOT = Path("runs")


def latest_run(root: Path = RUNS_ROOT) -> Path:
    """The most recently started run folder under ``root``."""
    candidates = [p for p in root.glob("*") if (p / "run.json").exists()] if root.is_dir() else []
    if not candidates:
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


def open_run(path: str | Path | None, device: torch.device, checkpoint: Literal["last", "best"] = "last", prior_override: str | None = None) -> FinetunedRun:
    """Open ``path`` (default: the latest run); the prior must be the one the run was fine-tuned on."""
    run_dir = Path(path) if path is not None else latest_run()
    if not run_dir.is_dir():
        raise DeftError(f"run '{run_dir}': no such folder")
    try:
        spec = FinetuneSpec.model_validate(read_json(run_dir / "spec.json"))
    except ValidationError as exc:
        raise DeftError(validation_message(exc, str(run_dir / "spec.json"))) from None
    info = read_json(run_dir / "run.json")
    prior = load_prior(prior_override or spec.prior.path).to(device)
    recorded = info.get("prior", {}).get("sha256")
    current = prior.identity().get("sha256")
    if recorded and current and recorded != current:
        raise DeftError(f"{run_dir}: the prior's weights changed since fine-tuning (sha256 {current[:12]}… ≠ recorded {recorded[:12]}…)")
    operator = create(spec.operator.name, **spec.operator.params)
    htransform, _ = load_htransform(run_dir / f"hnet_{checkpoint}.safetensors", prior)
    return FinetunedRun(run_dir, spec, info, prior, operator, htransform.to(device).eval().requires_grad_(False))
