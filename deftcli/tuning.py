"""Tuned defaults a prior ships: the fine-tuning and sampling settings selected for it on training images.

A prior folder may hold ``tuning.json``: per operator name, the settings that a sweep on *training*
images selected for that prior (``benchmarks/sample_quality.py`` writes the sweep; the file says which
images and which results). ``deft finetune`` takes the ``finetune`` part for every field the user left
unset and records what it took in ``run.json`` together with the ``sampling`` part, which ``deft sample``
and ``deft eval`` then use for every deft option left unset. A prior without the file, or an operator
it does not name, keeps the built-in defaults (the posterior, w = γ = 1, the reverse SDE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from .checkpoint import read_json
from .errors import DeftError
from .samplers import SamplerKind
from .specs import FinetuneSpec, StrictModel, validation_message

TUNING_FILE = "tuning.json"
BUILT_IN_ITERATIONS = 100
BUILT_IN_LIKELIHOOD_WEIGHT = 1.0


class FinetuneDefaults(StrictModel):
    """What ``deft finetune`` uses for the fields left unset."""

    likelihood_weight: float = Field(BUILT_IN_LIKELIHOOD_WEIGHT, gt=0, le=100)
    iterations: int = Field(BUILT_IN_ITERATIONS, ge=1)
    hnet_start: Literal["zero", "gaussian"] = "zero"


SPEC_FIELDS = {"likelihood_weight": "likelihood_weight", "iterations": "iterations", "hnet_start": "hnet.start"}
"""Each fine-tuning default and the (dotted) field of :class:`~deftcli.specs.FinetuneSpec` it fills."""


class SamplingDefaults(StrictModel):
    """What ``deft sample`` and ``deft eval`` use for deft's options left unset."""

    guidance_scale: float = Field(1.0, ge=0)
    sampler: SamplerKind = "sde"
    renoise_zeta: float = Field(1.0, ge=0, le=1)


class OperatorTuning(StrictModel):
    finetune: FinetuneDefaults = FinetuneDefaults()
    sampling: SamplingDefaults = SamplingDefaults()


class PriorTuning(StrictModel):
    """The content of a prior's ``tuning.json``."""

    selected_by: str = Field(
        description="how the settings were chosen: the training images, the script and its results"
    )
    operators: dict[str, OperatorTuning]


def read_tuning(prior_folder: Path) -> PriorTuning | None:
    """The prior's ``tuning.json``, or None when it has none."""
    path = prior_folder / TUNING_FILE
    if not path.is_file():
        return None
    try:
        return PriorTuning.model_validate(read_json(path))
    except ValidationError as exc:
        raise DeftError(validation_message(exc, str(path))) from None


def tuned_for(tuning: PriorTuning | None, operator_name: str) -> OperatorTuning | None:
    """The tuned settings of ``operator_name``, if the prior's tuning names it."""
    return None if tuning is None else tuning.operators.get(operator_name)


def spec_value(spec: FinetuneSpec, name: str) -> Any:
    """The value of the tunable field ``name`` (a key of :data:`SPEC_FIELDS`) in ``spec``."""
    node: Any = spec
    for part in SPEC_FIELDS[name].split("."):
        node = getattr(node, part)
    return node


def unset_fields(spec: FinetuneSpec) -> list[str]:
    """The tunable fields ``spec`` leaves unset (None)."""
    return [name for name in SPEC_FIELDS if spec_value(spec, name) is None]


def filled(spec: FinetuneSpec, values: dict[str, Any]) -> FinetuneSpec:
    """``spec`` with the tunable fields named in ``values`` set to them."""
    data = spec.model_dump()
    for name, value in values.items():
        *parents, leaf = SPEC_FIELDS[name].split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    return FinetuneSpec.model_validate(data)


def with_tuned_defaults(spec: FinetuneSpec, tuning: PriorTuning | None) -> tuple[FinetuneSpec, dict[str, Any]]:
    """``spec`` with every tunable field it leaves unset filled from the prior's tuning for its operator,
    else from the built-in defaults; and the fields taken from the tuning."""
    tuned = tuned_for(tuning, spec.operator.name)
    defaults = tuned.finetune if tuned is not None else FinetuneDefaults()
    taken = {name: getattr(defaults, name) for name in unset_fields(spec)}
    return filled(spec, taken), taken if tuned is not None else {}


def run_record(tuning: PriorTuning | None, operator_name: str, taken: dict[str, Any]) -> dict[str, Any]:
    """What ``run.json`` keeps under ``tuned_defaults``: where the settings came from, the fine-tuning fields
    taken from it, and the sampling defaults for ``deft sample`` / ``deft eval``."""
    tuned = tuned_for(tuning, operator_name)
    if tuned is None:
        return {"source": None, "finetune": {}, "sampling": SamplingDefaults().model_dump()}
    return {"source": tuning.selected_by, "finetune": taken, "sampling": tuned.sampling.model_dump()}


def deft_sampling(
    recorded: SamplingDefaults, guidance_scale: float | None, sampler: SamplerKind | None, renoise_zeta: float | None
) -> SamplingDefaults:
    """deft's sampling settings: each one given (not None) as it is, the others as the run recorded them."""
    given = {"guidance_scale": guidance_scale, "sampler": sampler, "renoise_zeta": renoise_zeta}
    return recorded.model_copy(update={key: value for key, value in given.items() if value is not None})


def recorded_sampling(info: dict[str, Any]) -> SamplingDefaults:
    """The sampling defaults a run recorded (the built-in ones for a run that recorded none)."""
    recorded = info.get("tuned_defaults", {}).get("sampling") if isinstance(info.get("tuned_defaults"), dict) else None
    try:
        return SamplingDefaults.model_validate(recorded or {})
    except ValidationError as exc:
        raise DeftError(validation_message(exc, "run.json tuned_defaults.sampling")) from None
