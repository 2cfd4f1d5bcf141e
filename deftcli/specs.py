"""Run specs: the pydantic models of everything a user writes, and how they are loaded.

A spec file (YAML, TOML or JSON) holds the fields of one command's spec; command-line flags
override it field by field (dotted keys such as ``operator.name``). Unknown keys are rejected and
ranges are checked; any problem is a one-line :class:`DeftError` that names the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Callable, Literal, TypeVar, Union, get_args, get_origin

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import DeftError
from .samplers import SamplerKind
from .unet import UNetConfig

# DPS's ζ: the best of 0.3…30 on petals train, 4× super-resolution, σ_y 0.05, N = 50
# (benchmarks/results/sample_quality.json, sweeps.dps)
DEFAULT_DPS_ZETA = 10.0
# DiffPIR's λ and ζ: the best pair of `deft eval`'s sweep on petals train, 4× super-resolution, σ_y 0.05, N = 50,
# the shipped prior (sample_quality.json, sweeps.diffpir)
DEFAULT_DIFFPIR_LAMBDA = 0.25
DEFAULT_DIFFPIR_ZETA = 1.0
DEFAULT_DDRM_ETA = 0.85  # DDRM's η and η_b as in Kawar et al. 2022
DEFAULT_DDRM_ETA_B = 1.0

Device = str  # "auto", "cpu", "cuda", "cuda:1", "mps"
Precision = Literal["auto", "fp32", "bf16"]
"""The networks' precision: auto is bf16 on a CPU with native bf16 (AMX-BF16 or AVX512-BF16), else fp32
(deftcli.devices)."""
PRECISION_HELP = (
    "the networks' precision: fp32 (default), bf16 (CUDA, CPU) "
    "or auto (bf16 on a CPU with AMX-BF16 or AVX512-BF16, else fp32)"
)
COMPILE_HELP = (
    "torch.compile the prior and the h-network (inductor; compiles once per batch size, minutes on a small CPU)"
)
DatasetName = Literal["petals", "flowers102", "folder"]
Method = Literal["vargrad", "backprop"]
SamplerName = Literal["deft", "dps", "ddrm", "diffpir", "prior", "dagger"]
EVAL_METHODS: tuple[SamplerName, ...] = ("deft", "dps", "diffpir", "ddrm", "prior", "dagger")
"""What ``deft eval`` evaluates by default (ddrm and diffpir only where the operator has an SVD)."""
SPECTRAL_METHODS: tuple[SamplerName, ...] = ("ddrm", "diffpir")
"""The samplers that need the operator's singular value decomposition."""


class StrictModel(BaseModel):
    """Base of everything a user writes: unknown keys, inf/NaN and booleans in number fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads yes/no/true/false as booleans, which pydantic's lax mode would take as 1/0 in a number field."""
        if (
            isinstance(value, bool)
            and info.field_name is not None
            and bool not in leaf_types(cls.model_fields[info.field_name].annotation)
        ):
            raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
        return value


def leaf_types(annotation: Any) -> set[Any]:
    """The types and literal values an annotation admits at its top level: int | None → {int, NoneType}."""
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(leaf_types(a) for a in get_args(annotation)))
    if get_origin(annotation) is Literal:
        return set(get_args(annotation))
    return {annotation}


Seed = Annotated[int, Field(ge=0, lt=2**63, description="random seed (0 ≤ seed < 2⁶³, what torch.Generator accepts)")]


class SDEConfig(StrictModel):
    """β(t) = β0 + t (β1 − β0) of the VP-SDE."""

    beta_min: float = Field(0.1, gt=0)
    beta_max: float = Field(20.0, gt=0)


class DataSpec(StrictModel):
    """Which images: the embedded ``petals``, torchvision's ``flowers102``, or a ``folder`` of images."""

    dataset: DatasetName = "petals"
    root: str | None = Field(
        None, description="data folder (flowers102: download target or local copy; folder: the images)"
    )

    @model_validator(mode="after")
    def _petals_has_no_folder(self) -> "DataSpec":
        if self.dataset == "petals" and self.root is not None:
            raise ValueError(
                "petals is generated, not read from a folder: give --dataset folder or flowers102 with --data-root"
            )
        return self


class OperatorSpec(StrictModel):
    """A forward operator by registry name and its parameters (validated by the operator's own model)."""

    name: str = "superres"
    params: dict[str, Any] = Field(default_factory=dict)


class PriorSpec(StrictModel):
    """A prior folder or name; ``None`` is the shipped default ``model_weights/petals32``."""

    path: str | None = None


class PretrainSpec(StrictModel):
    """``deft pretrain``: denoising score matching of a UNet prior on the VP-SDE."""

    data: DataSpec = DataSpec()
    image_size: int = Field(32, ge=8)
    channels: Literal[1, 3] = 3
    unet: UNetConfig = UNetConfig(model_channels=32, channel_mult=(1, 2, 2))
    parametrisation: Literal["gaussian-residual", "plain"] = Field(
        "gaussian-residual", description="score = exact Gaussian score + UNet (default), or the original's score = UNet"
    )
    sde: SDEConfig = SDEConfig()
    iterations: int = Field(20000, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="stop (and save) after this much wall time, counted over every leg of a resumed run"
    )
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0, le=1)
    warmup: int = Field(200, ge=0, description="linear learning-rate warm-up steps")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    sample_every: int = Field(500, ge=1, description="steps between sample grids")
    checkpoint_every: int = Field(100, ge=1)
    sample_steps: int = Field(250, ge=2, description="reverse-SDE grid points for the sample grids")
    seed: Seed = 0
    device: Device = "auto"
    out: str = "runs/prior"
    name: str | None = Field(None, description="the prior's name (default: the output folder's name)")


class HNetSpec(StrictModel):
    """The h-transform network: NN_φ (a UNet, or an MLP for tiny problems, on [g, x_t]) and the scale c_ψ(t)."""

    architecture: Literal["unet", "mlp"] = "unet"
    model_channels: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="UNet base channels; "
        "None: the largest multiple of 4 within size_fraction of the prior's parameters",
    )
    size_fraction: float = Field(
        0.09, gt=0, le=1, description="automatic size: h-network parameters / prior parameters at most this"
    )
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = Field(1, ge=1)
    attention_resolutions: tuple[int, ...] = ()
    space_to_depth: int = Field(
        2,
        ge=1,
        description="UNet on r×r pixel blocks stacked as channels (r² fewer positions); "
        "1: full resolution, as the original",
    )
    time_embedding_dim: int = Field(64, ge=2)
    time_hidden: int = Field(64, ge=1)
    init_scale: float = 5e-3
    start: Literal["zero", "gaussian"] | None = Field(
        None,
        description="zero: h starts at ≈ 0, the prior, as the original; "
        "gaussian: h starts at the exact h-transform of the "
        "prior's Gaussian approximation, −c_0(t) g, and learns the rest (needs σ_y > 0): a lower J and a data residual "
        "at σ_y sooner; None: the prior's tuned choice for the operator (its tuning.json), else zero",
    )
    mlp_hidden: int = Field(256, ge=1, description="MLP architecture: hidden width")
    mlp_layers: int = Field(3, ge=1, description="MLP architecture: hidden layers")


DEFAULT_FINETUNE_LR = 5e-4
"""The h-network's learning rate for the posterior (w = 1)."""


class FinetuneSpec(StrictModel):
    """``deft finetune``: online SOC fine-tuning of an h-transform (DESIGN.md §1)."""

    prior: PriorSpec = PriorSpec()
    operator: OperatorSpec = OperatorSpec()
    data: DataSpec = DataSpec()
    measurement: str | None = Field(
        None,
        description="fine-tune for this one measurement (image or .safetensors) "
        "instead of amortising over the train split",
    )
    method: Method = "vargrad"
    iterations: int | None = Field(
        None,
        ge=1,
        description="None: the prior's tuned value for the operator (its tuning.json), else 100 "
        "(≈ 6 minutes for the default 4× super-resolution on a 2-core CPU)",
    )
    max_minutes: float | None = Field(
        None, gt=0, description="stop (and save) after this much training time, counted over every leg of a resumed run"
    )
    time_steps: int = Field(50, ge=3, description="N, points of the reversed-time grid (N − 1 steps)")
    measurements_per_batch: int = Field(2, ge=1, description="M measurements per batch (amortised mode)")
    trajectories: int = Field(4, ge=2, description="K trajectories per measurement")
    likelihood_weight: float | None = Field(
        None,
        gt=0,
        le=100,
        description="w: fine-tune for the tempered posterior p(x) p(y | x)^w, "
        "i.e. the likelihood with σ_y/√w (measurements keep σ_y); "
        "1 is the posterior, w > 1 a sharper one; None: the prior's tuned value for the operator, else 1",
    )
    lr: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Adam learning rate of the h-network (c_ψ: × time_lr_factor); "
        "default 5e-4 / w: h's input and guidance term "
        "scale with w, and w = 3 diverged at 5e-4",
    )
    time_lr_factor: float = Field(
        5.0,
        gt=0,
        description="c_ψ(t) learns at lr × this: it must grow by an order of magnitude from its small initial value",
    )
    lr_final_factor: float = Field(1e-3, gt=0, le=1, description="cosine decay to lr · this factor")
    warmup: int = Field(
        10, ge=0, description="linear learning-rate warm-up steps (Adam's first steps are lr-sized in every parameter)"
    )
    grad_clip: float = Field(1.0, gt=0)
    grad_fraction: float = Field(
        0.2, ge=0, le=1, description="fraction of steps that carry a gradient (plus the last two)"
    )
    loss_threshold: float | None = Field(
        None,
        gt=0,
        description="log-RND values above this are dropped before the variance "
        "(default 5e4 · max(1, m/3072) · w for m measured values)",
    )
    min_kept_fraction: float = Field(0.3, ge=0, le=1)
    max_bad_steps: int = Field(20, ge=1, description="stop after this many skipped steps in a row")
    micro_batch: int | None = Field(
        None, ge=1, description="backprop: trajectories per backward pass (gradient accumulation)"
    )
    gradient_checkpointing: bool = Field(True, description="backprop: recompute activations per step")
    hnet: HNetSpec = HNetSpec()
    precision: Precision = Field("fp32", description=PRECISION_HELP)
    compile: bool = Field(False, description=COMPILE_HELP)
    preview_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    snapshot_every: int | None = Field(
        None, ge=1, description="also keep the h-network every this many steps (snapshots/)"
    )
    seed: Seed = 0
    device: Device = "auto"
    run_dir: str | None = None

    def learning_rate(self) -> float:
        """``lr``, or its default 5e-4 / w."""
        return self.lr if self.lr is not None else DEFAULT_FINETUNE_LR / self.weight()

    def weight(self) -> float:
        """w, once resolved (the fine-tuner fills ``likelihood_weight`` from the prior's tuned defaults)."""
        if self.likelihood_weight is None:
            raise ValueError("likelihood_weight is resolved from the prior's tuned defaults before it is used")
        return self.likelihood_weight


GuidanceScale = Annotated[float, Field(ge=0)]
"""γ of deft's sampler s_θ + γ h (:class:`~deftcli.htransform.ConditionalScore`)."""
RenoiseZeta = Annotated[float, Field(ge=0, le=1, description="the renoise sampler's share of fresh noise per step")]
DEFT_SAMPLING_NOTE = "None: the run's tuned default (run.json, from the prior's tuning.json), else "
DiffPIRLambda = Annotated[float, Field(gt=0, description="DiffPIR's λ: ρ_t = λ σ_y² / σ̄_t² weighs the prior")]
DiffPIRZeta = Annotated[float, Field(ge=0, le=1, description="DiffPIR's ζ: the share of fresh noise when re-noising")]
DDRMEta = Annotated[float, Field(ge=0, le=1, description="DDRM's η: fresh-noise share of the unobserved")]
DDRMEtaB = Annotated[float, Field(ge=0, le=1, description="DDRM's η_b: weight of a measurement noisier than the state")]


class DiffPIRSweep(StrictModel):
    """The (λ, ζ) grid that ``deft eval`` sweeps for DiffPIR on training images: every λ with every ζ."""

    lambdas: list[DiffPIRLambda] = Field([0.25, 1.0, 4.0], min_length=1)
    zetas: list[DiffPIRZeta] = Field([0.3, 0.7, 1.0], min_length=1)


class SampleSpec(StrictModel):
    """``deft sample``: posterior (or unconditional) samples."""

    run: str | None = None
    prior: PriorSpec = PriorSpec()
    method: SamplerName = "deft"
    unconditional: bool = False
    n: int = Field(8, ge=1, le=100_000, description="samples per measurement")
    steps: int | None = Field(None, ge=3, description="grid points (default: the run's time_steps, or 100)")
    batch_size: int = Field(16, ge=1)
    dps_zeta: float = Field(
        DEFAULT_DPS_ZETA, gt=0, description="DPS step size ζ (the sweep of `deft eval` picks it per problem)"
    )
    diffpir_lambda: DiffPIRLambda = DEFAULT_DIFFPIR_LAMBDA
    diffpir_zeta: DiffPIRZeta = DEFAULT_DIFFPIR_ZETA
    ddrm_eta: DDRMEta = DEFAULT_DDRM_ETA
    ddrm_eta_b: DDRMEtaB = DEFAULT_DDRM_ETA_B
    guidance_scale: GuidanceScale | None = Field(
        None,
        description="deft: sample with s_θ + γ h; 1 is the fine-tuned posterior, γ > 1 a sharper likelihood; "
        + DEFT_SAMPLING_NOTE
        + "1",
    )
    sampler: SamplerKind | None = Field(
        None, description="deft: sde (Euler–Maruyama) or renoise (denoise and re-noise); " + DEFT_SAMPLING_NOTE + "sde"
    )
    renoise_zeta: RenoiseZeta | None = Field(None, description="deft's renoise sampler: ζ; " + DEFT_SAMPLING_NOTE + "1")
    denoise_final: bool = Field(True, description="return Tweedie's x̂0 at t = ε instead of x_ε")
    clip_x0: bool = Field(False, description="clip the prior's Tweedie x̂0 to [-1, 1] inside the sampler")
    precision: Precision = Field("fp32", description=PRECISION_HELP)
    compile: bool = Field(False, description=COMPILE_HELP)
    seed: Seed = 0
    device: Device = "auto"
    out: str = "out"

    @model_validator(mode="after")
    def _options_of_the_sampler(self) -> "SampleSpec":
        options = {
            "method": ("--method", None),
            "dps_zeta": ("--dps-zeta", "dps"),
            "guidance_scale": ("--guidance-scale", "deft"),
            "sampler": ("--sampler", "deft"),
            "renoise_zeta": ("--renoise-zeta", "deft"),
            "diffpir_lambda": ("--diffpir-lambda", "diffpir"),
            "diffpir_zeta": ("--diffpir-zeta", "diffpir"),
            "ddrm_eta": ("--ddrm-eta", "ddrm"),
            "ddrm_eta_b": ("--ddrm-eta-b", "ddrm"),
        }
        given = {field: options[field] for field in options if field in self.model_fields_set}
        if self.unconditional and given:
            raise ValueError(
                f"{', '.join(flag for flag, _ in given.values())}: a posterior sampler's option, "
                "but --unconditional draws prior samples"
            )
        for flag, method in given.values():
            if method is not None and self.method != method:
                raise ValueError(f"{flag} is an option of --method {method}, not of --method {self.method}")
        return self


class EvalSpec(StrictModel):
    """``deft eval``: metrics on a data split for the fine-tuned run and baselines."""

    run: str | None = None
    split: Literal["train", "val", "test"] = "val"
    n: int = Field(64, ge=1)
    k: int = Field(4, ge=1, description="samples per image (posterior mean over k)")
    methods: Annotated[list[SamplerName], Field(min_length=1)] | None = Field(
        None, description="None: deft, dps, diffpir, ddrm, prior, dagger (ddrm, diffpir where the operator has an SVD)"
    )
    steps: int | None = Field(None, ge=3)
    dps_zeta: float | None = Field(None, gt=0, description="None: select ζ by a sweep on training images")
    dps_sweep: list[Annotated[float, Field(gt=0)]] = Field([0.3, 1.0, 3.0, 10.0, 30.0], min_length=1)
    diffpir_lambda: DiffPIRLambda | None = Field(None, description="None: select λ by the sweep on training images")
    diffpir_zeta: DiffPIRZeta | None = Field(None, description="None: select ζ by the sweep on training images")
    diffpir_sweep: DiffPIRSweep = DiffPIRSweep()
    ddrm_eta: DDRMEta = DEFAULT_DDRM_ETA
    ddrm_eta_b: DDRMEtaB = DEFAULT_DDRM_ETA_B
    guidance_scale: float | Literal["sweep"] | None = Field(
        None,
        description="deft's γ (1: the fine-tuned posterior); 'sweep': select it on training images like ζ; "
        + DEFT_SAMPLING_NOTE
        + "1",
    )
    sampler: SamplerKind | None = Field(
        None, description="deft's sampler, sde or renoise; " + DEFT_SAMPLING_NOTE + "sde"
    )
    renoise_zeta: RenoiseZeta | None = Field(None, description="deft's renoise sampler: ζ; " + DEFT_SAMPLING_NOTE + "1")
    guidance_sweep: list[GuidanceScale] = Field([1.0, 1.5, 2.0, 3.0, 5.0], min_length=1)
    denoise_final: bool = True
    clip_x0: bool = Field(
        False, description="clip the prior's Tweedie x̂0 to [-1, 1] inside every sampler (deft, DPS, prior)"
    )
    precision: Precision = Field("fp32", description=PRECISION_HELP)
    compile: bool = Field(False, description=COMPILE_HELP)
    seed: Seed = 0
    device: Device = "auto"
    batch_size: int = Field(32, ge=1)
    out: str | None = None

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _number_or_sweep(cls, value: Any) -> Any:
        if value == "sweep" or value is None:
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if not number >= 0:
            raise ValueError("a number ≥ 0 or 'sweep'")
        return number

    @model_validator(mode="after")
    def _options_of_evaluated_methods(self) -> "EvalSpec":
        for field, method, flag in (
            ("dps_zeta", "dps", "--dps-zeta"),
            ("dps_sweep", "dps", "dps_sweep"),
            ("guidance_scale", "deft", "--guidance-scale"),
            ("guidance_sweep", "deft", "guidance_sweep"),
            ("sampler", "deft", "--sampler"),
            ("renoise_zeta", "deft", "--renoise-zeta"),
            ("diffpir_lambda", "diffpir", "--diffpir-lambda"),
            ("diffpir_zeta", "diffpir", "--diffpir-zeta"),
            ("diffpir_sweep", "diffpir", "diffpir_sweep"),
            ("ddrm_eta", "ddrm", "ddrm_eta"),
            ("ddrm_eta_b", "ddrm", "ddrm_eta_b"),
        ):
            if field in self.model_fields_set and method not in (self.methods or EVAL_METHODS):
                raise ValueError(f"{flag} is an option of {method}, but {method} is not among the methods")
        return self

    def spectral_methods_asked(self) -> list[SamplerName]:
        """The SVD-based methods asked for explicitly: in ``methods``, or through one of their options."""
        if self.methods is not None:
            return [m for m in self.methods if m in SPECTRAL_METHODS]
        return [m for m in SPECTRAL_METHODS if any(field.startswith(m + "_") for field in self.model_fields_set)]


S = TypeVar("S", bound=BaseModel)


class _DuplicateKey(Exception):
    """A key given twice in one mapping of a spec file (YAML and JSON would silently keep the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key)
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _unique_keys([(self.construct_object(key, deep=deep), None) for key, _ in node.value])
        return super().construct_mapping(node, deep=deep)


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML, TOML or JSON spec file into a dict (by suffix; YAML for anything else)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DeftError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeftError(f"{path}: cannot read spec file ({exc})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)  # TOML itself refuses a key given twice
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise DeftError(f"{path}: key '{exc}' is given twice") from None
    except yaml.YAMLError as exc:
        raise DeftError(f"{path}: not a valid YAML spec ({yaml_error_text(exc)})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise DeftError(
            f"{path}: not a valid {suffix.lstrip('.').upper()} spec ({' '.join(str(exc).split())})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DeftError(f"{path}: a spec must be a mapping of fields, got {type(data).__name__}")
    return data


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """A YAML error as a short phrase with its position (PyYAML's own text spans several lines with a caret)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def read_saved_spec(path: str | Path) -> dict[str, Any]:
    """The resolved spec a run folder keeps (``spec.json``), as a dict to resume from."""
    from .checkpoint import read_json

    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise DeftError(f"{path}: a saved spec must be a JSON object, got {type(data).__name__}")
    return data


def validation_message(exc: ValidationError, source: str | Callable[[str], str]) -> str:
    """One line naming the first invalid field, e.g. ``spec.yaml: lr: Input should be greater than 0``.

    ``source`` names where the values came from, or maps the field's dotted name to that.
    """
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(root)"
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    value = err.get("input")
    if err["type"] not in ("extra_forbidden", "missing") and isinstance(value, (str, int, float, bool)):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "…"
        msg += f" (got {shown})"
    return f"{source(where) if callable(source) else source}: {where}: {msg}{extra}"


def build_spec(
    model: type[S],
    spec_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> S:
    """Validate ``base`` ← spec file ← flag overrides (dotted keys; ``None`` values are ignored)."""
    data: dict[str, Any] = json.loads(json.dumps(base or {}, default=str))
    source = "spec"
    if spec_path is not None:
        _deep_update(data, read_spec_file(spec_path))
        source = str(spec_path)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DeftError(
                    f"{source}: {'.'.join(parents[: depth + 1])} must be a mapping of fields, "
                    f"got {type(node).__name__} {node!r}"
                )
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    flags = [key for key, value in (overrides or {}).items() if value is not None]

    def origin(field: str) -> str:  # a value set by a flag is blamed on the options, not on the file
        return "options" if spec_path is None or any(field == k or field.startswith(k + ".") for k in flags) else source

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DeftError(validation_message(exc, origin)) from None


def _deep_update(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
