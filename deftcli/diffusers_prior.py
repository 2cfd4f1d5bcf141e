r"""Diffusers priors: a ``UNet2DModel`` with a DDPM-like scheduler, as a score on the VP-SDE (DESIGN.md §2, format 3).

Two layouts load: a pipeline folder written by ``DDPMPipeline.save_pretrained`` (``model_index.json``,
``unet/``, ``scheduler/``) and a folder with just ``unet/`` and ``scheduler/``. diffusers is the optional
extra ``deft[diffusers]`` and is imported only inside the functions of this module, so ``import deftcli``
and the other prior formats never import it.

Discrete schedule → VP-SDE. A DDPM with T steps and betas b_1 … b_T (diffusers' ``betas[k]`` = b_{k+1})
noises x_k = √ᾱ_k x_0 + √(1 − ᾱ_k) ε with ᾱ_k = Π_{j ≤ k+1} (1 − b_j) at timestep k = 0 … T − 1. For
linear betas it is the Euler discretisation of the VP-SDE with β0 = T·b_1, β1 = T·b_T
(:meth:`VPSDE.from_discrete_betas`: 1e-4 … 0.02 over 1000 steps gives β 0.1 … 20); other schedules do not
map onto the linear VP-SDE and are refused.

Continuous t → discrete timestep τ. The network is evaluated at the float timestep whose ᾱ equals the
SDE's α(t)², ᾱ being interpolated linearly in log between integer timesteps:

    ℓ(τ) = −log ᾱ_τ  (piecewise linear through the points (k, −log ᾱ_k)),
    τ(t) = ℓ⁻¹(−2 log α(t))   clamped to [0, T − 1].

Checked for the 1e-4 … 0.02, T = 1000 schedule on 10⁵ points t ∈ [0, 1] (τ in float32, ᾱ_τ and α(t)² in
float64): max |ᾱ_τ − α(t)²| = 8.9e-8 and max |√(1 − ᾱ_τ)/σ(t) − 1| = 1.1e-7 for t ≥ t_min = 9.2e-4 (zero in
exact arithmetic). Below t_min, α(t)² > ᾱ_0 = 1 − b_1, τ clamps to 0 and |ᾱ_0 − α(t)²| ≤ 1e-4; the default
time grid ends at t = ε = 1e-3 > t_min (τ(1e-3) = 0.083). τ(t) stays within 3.4 steps of t·T − 1 (the
largest gap is at t = 1: τ(1) = 995.6). For comparison, the plain τ = t·T − 1 (DPM-Solver's convention for
discrete models) is off by up to 8.1e-4 in ᾱ (at t ≈ 0.14), i.e. by up to 2.5 % in √(1 − ᾱ) for t ≥ 0.01
and 4.6 % at t = 1e-3; τ = t·(T − 1) is off by up to 1.6e-3.

Score. With α = α(t) and σ = σ(t) the VP-SDE's continuous values and u the network output at τ(t):

    epsilon:        ε̂ = u
    sample:         ε̂ = (x − α u) / σ      (u = x̂0)
    v_prediction:   ε̂ = α u + σ x          (u = v̂ = α ε − σ x0)
    s(x, t) = −ε̂ / σ(t).

Because τ(t) matches ᾱ_τ = α(t)², σ(t) = √(1 − ᾱ_τ) for t ≥ t_min, so this is DESIGN's −ε/√(1 − ᾱ), and
Tweedie's x̂0 = (x + σ² s)/α (:meth:`VPSDE.tweedie_x0`) is the network's own x̂0. Below t_min the
continuous σ(t) is kept: x is noised at level σ(t), and the score stays consistent with the SDE's Tweedie
formula. A UNet with 2C output channels and a scheduler with ``variance_type`` ``learned`` or
``learned_range`` predicts (u, variance); the variance half is dropped.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import file_sha256, read_json
from .errors import DeftError
from .prior_interface import Prior
from .sde import VPSDE

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LEARNED_VARIANCE = ("learned", "learned_range")
# The scheduler settings that determine the training betas (the rest only affect sampling with diffusers).
BETA_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class DiffusersPrior(Prior):
    """A frozen diffusers ``UNet2DModel`` read as the score of the VP-SDE (see the module docstring)."""

    def __init__(
        self,
        unet: nn.Module,
        sde: VPSDE,
        alphas_cumprod: Tensor,
        prediction_type: str,
        image_shape: tuple[int, int, int],
        name: str,
        source: dict[str, Any],
    ) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.sde = sde
        self.register_buffer("neg_log_alphas_cumprod", -torch.log(alphas_cumprod.double()).float(), persistent=False)
        self.prediction_type = prediction_type
        self.image_shape = tuple(image_shape)  # type: ignore[assignment]
        self.name = name
        self.source = source

    def timestep(self, t: Tensor) -> Tensor:
        """τ(t) = ℓ⁻¹(−2 log α(t)) in [0, T − 1], ℓ the piecewise-linear −log ᾱ over the integer timesteps."""
        table = self.neg_log_alphas_cumprod
        target = (-2.0 * self.sde.log_alpha(t.to(table))).contiguous()
        hi = torch.searchsorted(table, target).clamp(1, table.numel() - 1)
        lo = hi - 1
        frac = (target - table[lo]) / (table[hi] - table[lo])
        return (lo + frac).clamp(0, table.numel() - 1)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """s(x, t) = −ε̂(x, τ(t)) / σ(t), ε̂ derived from the network's prediction type."""
        t = t.to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        out = self.unet(x, self.timestep(t)).sample.to(x.dtype)[:, : x.shape[1]]
        alpha = self.sde.alpha(t).to(x.dtype).view(-1, 1, 1, 1)
        sigma = self.sde.sigma(t).to(x.dtype).view(-1, 1, 1, 1)
        if self.prediction_type == "epsilon":
            eps = out
        elif self.prediction_type == "sample":
            eps = (x - alpha * out) / sigma
        else:
            eps = alpha * out + sigma * x
        return -eps / sigma

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "image_shape": list(self.image_shape), **self.source}


def import_diffusers() -> ModuleType:
    """The ``diffusers`` module, or a DeftError naming the optional extra."""
    try:
        import diffusers
    except ImportError:
        raise DeftError("diffusers priors need the optional dependency: pip install 'deft[diffusers]'") from None
    return diffusers


def load_diffusers_prior(folder: Path) -> DiffusersPrior:
    """Load ``folder/unet`` (a ``UNet2DModel``) and ``folder/scheduler`` (DDPM-like, linear betas) as a prior."""
    diffusers = import_diffusers()
    folder = Path(folder)
    for sub in ("unet", "scheduler"):
        if not (folder / sub).is_dir():
            raise DeftError(f"{folder}: a diffusers prior needs unet/ and scheduler/ subfolders; {sub}/ is missing")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path)
    scheduler = ddpm_scheduler(diffusers, scheduler_config, scheduler_path)
    sde = discrete_to_sde(scheduler.betas, scheduler_config, scheduler_path)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise DeftError(
            f"{scheduler_path}: prediction_type {prediction_type!r} is not supported "
            f"(supported: {', '.join(PREDICTION_TYPES)})"
        )

    unet_path = folder / "unet" / "config.json"
    image_shape = unet_image_shape(read_json(unet_path), scheduler_config.get("variance_type"), unet_path)
    weights = [folder / "unet" / n for n in WEIGHT_NAMES if (folder / "unet" / n).is_file()]
    if not weights:
        raise DeftError(f"{folder / 'unet'}: no weights file (expected {' or '.join(WEIGHT_NAMES)})")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(
            folder / "unet", use_safetensors=weights[0].suffix == ".safetensors", low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise DeftError(f"{weights[0]}: cannot load the UNet2DModel ({' '.join(str(exc).split())[:200]})") from None
    source = {
        "format": "diffusers",
        "path": str(folder),
        "weights": weights[0].name,
        "sha256": file_sha256(weights[0]),
        "prediction_type": prediction_type,
        "num_train_timesteps": int(scheduler.config.num_train_timesteps),
    }
    return DiffusersPrior(unet, sde, scheduler.alphas_cumprod, prediction_type, image_shape, folder.name, source)


def ddpm_scheduler(diffusers: ModuleType, config: Any, path: Path) -> Any:
    """A ``DDPMScheduler`` with the training betas of a DDPM-like scheduler config (DDPM, DDIM, PNDM, …)."""
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("num_train_timesteps"), int)
        or (config.get("beta_schedule") is None and config.get("trained_betas") is None)
    ):
        raise DeftError(
            f"{path}: not a DDPM-like scheduler (needs num_train_timesteps and beta_schedule or trained_betas)"
        )
    try:
        return diffusers.DDPMScheduler.from_config({k: config[k] for k in BETA_KEYS if k in config})
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise DeftError(
            f"{path}: unsupported beta schedule {config.get('beta_schedule')!r} ({' '.join(str(exc).split())[:160]})"
        ) from None


def discrete_to_sde(betas: Tensor, config: dict[str, Any], path: Path) -> VPSDE:
    """The VP-SDE of linear betas, β0 = T·b_1, β1 = T·b_T; any other schedule is a DeftError naming it."""
    try:
        return VPSDE.from_discrete_betas(betas.double())
    except ValueError:
        schedule = "trained_betas" if config.get("trained_betas") is not None else repr(config.get("beta_schedule"))
        if config.get("rescale_betas_zero_snr"):
            schedule += " with rescale_betas_zero_snr"
        raise DeftError(
            f"{path}: beta schedule {schedule} is not linear; only linear DDPM betas map onto the VP-SDE"
        ) from None


def unet_image_shape(config: Any, variance_type: str | None, path: Path) -> tuple[int, int, int]:
    """(C, H, W) of an unconditional ``UNet2DModel`` config, checking its output channels."""
    if not isinstance(config, dict) or config.get("_class_name") != "UNet2DModel":
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise DeftError(f"{path}: expected an unconditional UNet2DModel, found {found!r}")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise DeftError(f"{path}: class-conditional UNet2DModel is not supported (deft needs an unconditional prior)")
    channels, size = config.get("in_channels", 3), config.get("sample_size")
    out_channels = config.get("out_channels", 3)
    if out_channels != channels and not (out_channels == 2 * channels and variance_type in LEARNED_VARIANCE):
        raise DeftError(
            f"{path}: out_channels {out_channels} does not match in_channels {channels} "
            f"(variance_type {variance_type!r})"
        )
    if isinstance(size, int):
        return (int(channels), size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(channels), int(size[0]), int(size[1]))
    raise DeftError(f"{path}: sample_size {size!r} is not an image size")
