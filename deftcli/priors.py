"""Diffusion priors (:class:`~deftcli.prior_interface.Prior`): the UNet prior and the loader of every format.

:func:`load_prior` detects the format of a folder:

1. this project's own: ``config.json`` + ``model.safetensors`` (written by ``deft pretrain``);
2. the original research code's: ``model.pt`` (a state dict, possibly saved on a GPU) +
   ``report.yaml`` (sections ``model`` and ``diffusion``); loaded with ``weights_only=True``;
3. a diffusers folder (``UNet2DModel`` + ``DDPMScheduler``), see :mod:`deftcli.diffusers_prior`;
4. an analytic Gaussian mixture (``config.json`` with ``"format": "gaussian-mixture"``).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from pydantic import ValidationError
from torch import Tensor, nn

from .checkpoint import file_sha256, load_weights, read_json
from .diffusers_prior import load_diffusers_prior
from .errors import DeftError
from .gmm import GaussianMixturePrior
from .prior_interface import Prior
from .sde import VPSDE
from .specs import yaml_error_text
from .tuning import read_tuning
from .unet import UNet, UNetConfig

DEFAULT_PRIOR = "petals32"
ORIGINAL_IMAGE_SIZE = 64  # the original code's report.yaml does not record it; its Flowers102 prior is 64×64


def model_weights_dir() -> Path:
    """Folder of shipped priors: ``$DEFT_MODEL_WEIGHTS`` or ``model_weights/`` beside the package."""
    env = os.environ.get("DEFT_MODEL_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "model_weights"


@dataclass(frozen=True)
class GaussianScore:
    r"""The exact score of N(μ, v I) (per-channel mean μ) under the VP-SDE:

        s_G(x, t) = −(x − α(t) μ) / (α(t)² v + σ(t)²)

    A ``gaussian-residual`` prior is s_G + UNet: the network learns only what the data adds to the
    best Gaussian model. At high noise s_G is already nearly exact, so the sampler does not depend
    on the network reproducing x/σ² to a fraction of a percent there (a plain ε-network that
    misses it by 0.3 % inflates x̂0 = (x + σ² s)/α by 1/α ≈ 150 at t = 1 and diverges).
    """

    mean: tuple[float, ...]
    variance: float

    def __call__(self, x: Tensor, t: Tensor, sde: VPSDE) -> Tensor:
        alpha = sde.alpha(t)[:, None, None, None]
        var = alpha**2 * self.variance + sde.sigma(t)[:, None, None, None] ** 2
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[None, :, None, None]
        return -(x - alpha * mean) / var

    @classmethod
    def fit(cls, images: Tensor) -> "GaussianScore":
        """Per-channel mean and the mean per-pixel variance of a batch of images (B, C, H, W)."""
        mean = images.mean(dim=(0, 2, 3))
        return cls(tuple(float(m) for m in mean), float((images - mean[None, :, None, None]).pow(2).mean()))


def unet_score(unet: nn.Module, gaussian: GaussianScore | None, sde: VPSDE):
    """s(x, t) = UNet(x, t) [+ s_G(x, t) for a gaussian-residual prior]."""
    if gaussian is None:
        return unet
    return lambda x, t: unet(x, t) + gaussian(x, t, sde)


class UNetPrior(Prior):
    """A frozen :class:`UNet` whose output is the score (plus :class:`GaussianScore` when residual).

    On the CPU its convolution weights are kept channels-last (NHWC), so the convolutions run in that
    layout and return channels-last activations: with oneDNN the prior's forward and backward passes are
    faster that way (``benchmarks/research/results/prior_layout.json``). On other
    devices they stay contiguous: that is not measured there, and CUDA's GroupNorm has long returned
    contiguous outputs, which would convert the layout around every normalisation.
    """

    def __init__(
        self,
        unet: UNet,
        sde: VPSDE,
        image_shape: tuple[int, int, int],
        name: str,
        source: dict[str, Any],
        gaussian: GaussianScore | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.sde = sde
        self.image_shape = tuple(image_shape)  # type: ignore[assignment]
        self.name = name
        self.source = source
        self.gaussian = gaussian
        self._score = unet_score(self.unet, gaussian, sde)
        self._use_device_layout()

    def _apply(
        self, fn: Callable[[Tensor], Tensor], recurse: bool = True
    ) -> "UNetPrior":  # every .to(), .cuda(), .cpu() ends here
        super()._apply(fn, recurse)
        self._use_device_layout()
        return self

    def _use_device_layout(self) -> None:
        on_cpu = next(self.unet.parameters()).device.type == "cpu"
        self.unet.to(memory_format=torch.channels_last if on_cpu else torch.contiguous_format)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        return self._score(x, t)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "image_shape": list(self.image_shape), **self.source}

    def pixel_variance(self) -> float:
        return self.gaussian.variance if self.gaussian is not None else super().pixel_variance()


def state_dict_mismatch(model: nn.Module, state: dict[str, Tensor]) -> str | None:
    """The first missing / unexpected keys and shape mismatches of ``state`` for ``model``, or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:3]}{' …' if len(missing) > 3 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
    if wrong:
        k = wrong[0]
        parts.append(f"shape mismatch for {k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}")
    return "; ".join(parts) or None


def build_unet_prior(
    config: UNetConfig,
    sde: VPSDE,
    state: dict[str, Tensor],
    image_shape,
    name: str,
    source: dict[str, Any],
    where: Path,
    gaussian: GaussianScore | None = None,
) -> UNetPrior:
    """Build the UNet for ``config``, load ``state`` strictly, and wrap it as a prior."""
    unet = UNet(config, sde.sigma)
    problem = state_dict_mismatch(unet, state)
    if problem:
        raise DeftError(f"{where}: weights do not match the architecture in its config: {problem}")
    unet.load_state_dict(state, strict=True)
    return UNetPrior(unet, sde, image_shape, name, source, gaussian)


def load_own_prior(folder: Path) -> Prior:
    """A ``deft pretrain`` folder (or a Gaussian mixture written by this project)."""
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise DeftError(f"{folder / 'config.json'}: expected a JSON object")
    fmt = config.get("format")
    if fmt == "gaussian-mixture":
        return GaussianMixturePrior.load(folder)
    if fmt != "deft-unet-prior":
        raise DeftError(
            f"{folder / 'config.json'}: unknown prior format {fmt!r} (expected 'deft-unet-prior' or 'gaussian-mixture')"
        )
    try:
        unet_config = UNetConfig.model_validate(config["unet"])
        sde = VPSDE(**config["sde"])
        image_shape = tuple(int(v) for v in config["image_shape"])
        residual = config.get("gaussian_residual")
        gaussian = (
            None
            if residual is None
            else GaussianScore(tuple(float(m) for m in residual["mean"]), float(residual["variance"]))
        )
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise DeftError(
            f"{folder / 'config.json'}: invalid prior config ({' '.join(str(exc).split())[:200]})"
        ) from None
    weights = folder / "model.safetensors"
    state, _ = load_weights(weights)
    source = {"format": "deft", "path": str(folder), "sha256": file_sha256(weights)}
    return build_unet_prior(
        unet_config, sde, state, image_shape, config.get("name", folder.name), source, weights, gaussian
    )


def load_original_prior(folder: Path) -> Prior:
    """The original research code's ``model.pt`` + ``report.yaml`` (never unpickling arbitrary objects)."""
    report_path = folder / "report.yaml"
    try:
        report = yaml.safe_load(report_path.read_text())
        model_cfg = dict(report["model"])
        diffusion = report.get("diffusion", {})
    except yaml.YAMLError as exc:
        raise DeftError(f"{report_path}: not a valid original report.yaml ({yaml_error_text(exc)})") from None
    except (OSError, KeyError, TypeError) as exc:
        raise DeftError(
            f"{report_path}: not a valid original report.yaml ({' '.join(str(exc).split())[:200]})"
        ) from None
    if diffusion.get("sde", "VPSDE") != "VPSDE":
        raise DeftError(f"{report_path}: only VPSDE priors are supported, got {diffusion.get('sde')!r}")
    try:
        unet_config = UNetConfig.model_validate(model_cfg)
    except ValidationError as exc:
        raise DeftError(
            f"{report_path}: invalid model section ({exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})"
        ) from None
    sde = VPSDE(beta_min=float(diffusion.get("beta_min", 0.1)), beta_max=float(diffusion.get("beta_max", 20.0)))
    size = (
        int(report.get("data", {}).get("image_size", ORIGINAL_IMAGE_SIZE))
        if isinstance(report.get("data"), dict)
        else ORIGINAL_IMAGE_SIZE
    )
    weights = folder / "model.pt"
    state = load_torch_state_dict(weights)
    source = {"format": "original", "path": str(folder), "sha256": file_sha256(weights)}
    return build_unet_prior(
        unet_config, sde, state, (unet_config.out_channels, size, size), folder.name, source, weights
    )


def _unpickler_refusal(exc: Exception) -> str:
    """The reason in torch's weights-only refusal (its message is several paragraphs with terminal escapes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\n|$)", text, re.S)
    return " ".join((found.group(1) if found else text).split())[:160] or "unsafe content"


def load_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """``torch.load(weights_only=True, map_location='cpu')`` of a state dict; anything else is refused."""
    try:
        with warnings.catch_warnings():  # torch warns (on stderr) about pickle protocols before refusing or loading
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise DeftError(
            f"{path}: refused to load: not a plain tensor state dict, "
            f"unpickling it could run code ({_unpickler_refusal(exc)})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise DeftError(f"{path}: cannot read torch file ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DeftError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_prior(path_or_name: str | os.PathLike | None = None) -> Prior:
    """Load a prior from a folder (any of the supported formats) or a shipped prior's name, with the
    folder's tuned defaults (``tuning.json``, :mod:`deftcli.tuning`) where it has them."""
    folder = prior_folder(path_or_name)
    prior = load_prior_weights(folder)
    prior.tuning = read_tuning(folder)
    return prior


def prior_folder(path_or_name: str | os.PathLike | None) -> Path:
    """The folder of a prior given by path or by a shipped prior's name (None: the default prior)."""
    if path_or_name is None:
        path_or_name = DEFAULT_PRIOR
    folder = Path(path_or_name)
    if not folder.exists() and (model_weights_dir() / str(path_or_name)).is_dir():
        folder = model_weights_dir() / str(path_or_name)
    if not folder.exists():
        raise DeftError(
            f"prior '{path_or_name}': no such folder or shipped prior "
            f"(shipped: {', '.join(shipped_priors()) or 'none'})"
        )
    if not folder.is_dir():
        raise DeftError(
            f"prior '{folder}': expected a folder (config.json + model.safetensors, or model.pt + report.yaml)"
        )
    return folder


def load_prior_weights(folder: Path) -> Prior:
    """The prior in ``folder``, by the format its files show."""
    if (folder / "model_index.json").exists() or (folder / "scheduler").is_dir():
        return load_diffusers_prior(folder)
    if (folder / "config.json").exists():
        return load_own_prior(folder)
    if (folder / "model.pt").exists() and (folder / "report.yaml").exists():
        return load_original_prior(folder)
    present = sorted(p.name for p in folder.iterdir())[:8]
    raise DeftError(
        f"prior '{folder}': unrecognised folder (found {present}); expected config.json + model.safetensors, "
        "model.pt + report.yaml, or a diffusers UNet2DModel + DDPMScheduler"
    )


def shipped_priors() -> list[str]:
    root = model_weights_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists()) if root.is_dir() else []
