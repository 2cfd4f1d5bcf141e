r"""Reconstruction methods as sampler objects with one protocol (:class:`Sampler`).

- ``deft`` (:class:`DeftSampler`): the fine-tuned score s_θ + γ h
  (:class:`~deftcli.htransform.ConditionalScore`; γ = 1 is the fine-tuned posterior, γ > 1 a sharper
  likelihood), integrated by the ``sde`` sampler or the ``renoise`` sampler with fresh-noise fraction ζ
  (:mod:`deftcli.samplers`);
- ``dps`` (:class:`DPSSampler`): diffusion posterior sampling (Chung et al. 2023): after each prior
  reverse-SDE step, x ← x − ζ ∇_{x_t} ‖y − A x̂0(x_t)‖ (autograd through the prior), as the loop's guidance hook;
- ``ddrm`` (:class:`DDRMSampler`): denoising diffusion restoration models (Kawar et al. 2022, :mod:`deftcli.ddrm`)
  and ``diffpir`` (:class:`DiffPIRSampler`): diffusion plug-and-play restoration (Zhu et al. 2023,
  :mod:`deftcli.diffpir`), both on the operator's SVD (:meth:`~deftcli.operators.Operator.svd`), the prior's
  score and the same time grid;
- ``prior`` (:class:`PriorSampler`): unconditional samples of the prior (y gives only the batch size);
- ``dagger`` (:class:`BackProjection`): the back-projection A†y (deterministic, no network).

Every sampler returns samples (B, C, H, W) for measurements (B, …) and a noise sampler, counts its network
evaluations per sample (:meth:`Sampler.cost`) and names its own knobs (:meth:`Sampler.settings`, under the
names the command line and the results files use); :func:`build_sampler` makes one by its method name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from .ddrm import sample_ddrm
from .diffpir import sample_diffpir
from .errors import DeftError
from .htransform import ConditionalScore, HTransform
from .operators import Operator, SingularValueDecomposition
from .priors import Prior
from .samplers import NoiseSampler, SamplerKind, ScoreFn, clip_denoised, sample_renoise, sample_reverse_sde
from .sde import VPSDE, reverse_time_grid
from .specs import (
    DEFAULT_DDRM_ETA,
    DEFAULT_DDRM_ETA_B,
    DEFAULT_DIFFPIR_LAMBDA,
    DEFAULT_DIFFPIR_ZETA,
    DEFAULT_DPS_ZETA,
    SamplerName,
)


@dataclass
class Cost:
    """Network evaluations per sample: prior forward passes, h-network passes, and whether DPS backpropagates."""

    prior: int = 0
    hnet: int = 0
    prior_backward: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"nfe_prior": self.prior, "nfe_hnet": self.hnet, "backward_prior": self.prior_backward}


class Sampler(Protocol):
    """A reconstruction method: samples for measurements, their cost, and its settings for the record."""

    method: ClassVar[SamplerName]
    deterministic: ClassVar[bool]
    """Whether the output ignores the noise: one output per measurement, no spread to calibrate."""

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        """One sample per row of y (B, …) → (B, C, H, W)."""
        ...

    def cost(self) -> Cost: ...

    def settings(self) -> dict[str, Any]: ...

    def with_settings(self, **settings: Any) -> Sampler:
        """A copy with some of :meth:`settings` changed (what a sweep tries)."""
        ...


@dataclass(frozen=True)
class SamplingSetup:
    """What the diffusion samplers share: the prior, N time steps, whether to return Tweedie's x̂0 at t = ε
    (one more evaluation), and whether to clip x̂0 to [-1, 1] (:func:`~deftcli.samplers.clip_denoised`)."""

    prior: Prior
    steps: int = 100
    denoise_final: bool = True
    clip_x0: bool = False

    @property
    def grid(self) -> list[float]:
        return reverse_time_grid(self.steps)

    @property
    def sde(self) -> VPSDE:
        return self.prior.sde

    def prior_score(self) -> ScoreFn:
        return clip_denoised(self.prior.score, self.prior.sde) if self.clip_x0 else self.prior.score

    def start(self, n: int, device: torch.device, noise: NoiseSampler) -> Tensor:
        """x at t = 1: n draws of N(0, I) of the prior's image shape."""
        return noise((n, *self.prior.image_shape), device)

    def evaluations(self) -> int:
        """Score evaluations per sample: N − 1 steps, plus one with ``denoise_final``."""
        return self.steps - 1 + int(self.denoise_final)


class SamplerBase:
    """What the sampler classes share: :meth:`settings` and :meth:`with_settings` from ``SETTINGS`` (each knob's
    public name → its field), and that a sampler samples (``deterministic`` False) unless it says otherwise."""

    SETTINGS: ClassVar[dict[str, str]] = {}
    deterministic: ClassVar[bool] = False

    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, field) for name, field in self.SETTINGS.items()}

    def with_settings(self, **settings: Any) -> Any:
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no setting {', '.join(unknown)}")
        return replace(self, **{self.SETTINGS[name]: value for name, value in settings.items()})  # type: ignore[type-var]


def operator_svd(method: str, operator: Operator) -> SingularValueDecomposition:
    """The operator's SVD for a spectral method, or a one-line error naming the operator that has none."""
    svd = operator.svd()
    if svd is None:
        raise DeftError(
            f"method '{method}' needs the operator's singular value decomposition, "
            f"and operator '{operator.name}' provides none (its svd() returns None)"
        )
    return svd


@dataclass(frozen=True)
class DeftSampler(SamplerBase):
    """The fine-tuned posterior: s_θ + γ h over the ``sde`` or the ``renoise`` sampler."""

    setup: SamplingSetup
    operator: Operator
    htransform: HTransform
    guidance_scale: float = 1.0
    sampler: SamplerKind = "sde"
    renoise_zeta: float = 1.0

    method: ClassVar[SamplerName] = "deft"
    SETTINGS: ClassVar[dict[str, str]] = {
        "guidance_scale": "guidance_scale",
        "sampler": "sampler",
        "renoise_zeta": "renoise_zeta",
    }

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        setup = self.setup
        x = setup.start(y.shape[0], y.device, noise)
        score: ScoreFn = ConditionalScore(setup.prior, self.htransform, self.operator, y, self.guidance_scale)
        if setup.clip_x0:
            score = clip_denoised(score, setup.sde)
        if self.sampler == "renoise":
            return sample_renoise(score, setup.sde, x, setup.grid, noise, setup.denoise_final, self.renoise_zeta)
        return sample_reverse_sde(score, setup.sde, x, setup.grid, noise, setup.denoise_final)

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations(), hnet=self.setup.evaluations())

    def settings(self) -> dict[str, Any]:
        """γ, the run's likelihood weight w, the sampler, and ζ for ``renoise``."""
        renoise = {"renoise_zeta": self.renoise_zeta} if self.sampler == "renoise" else {}
        return {
            "guidance_scale": self.guidance_scale,
            "likelihood_weight": self.htransform.config.likelihood_weight,
            "sampler": self.sampler,
            **renoise,
        }


@dataclass(frozen=True)
class DPSGuidance:
    """DPS's per-step hook: the prior score s_θ(x_t, t) and the shift −ζ ∇_{x_t} ‖y − A x̂0(x_t)‖, both detached.

    ∇_{x_t} goes through Tweedie's x̂0(x_t) = (x_t + σ² s_θ(x_t, t))/α, i.e. one backward pass of the prior.
    """

    sde: VPSDE
    operator: Operator
    y: Tensor
    zeta: float

    def __call__(self, score_fn: ScoreFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            score = score_fn(x_in, t)
            residual = (self.y - self.operator.A(self.sde.tweedie_x0(x_in, score, t))).flatten(1).norm(dim=1)
            (grad,) = torch.autograd.grad(residual.sum(), x_in)
        return score.detach(), -self.zeta * grad


@dataclass(frozen=True)
class DPSSampler(SamplerBase):
    """DPS: the prior's reverse-SDE steps, each followed by DPS's shift (:class:`DPSGuidance`)."""

    setup: SamplingSetup
    operator: Operator
    zeta: float = DEFAULT_DPS_ZETA

    method: ClassVar[SamplerName] = "dps"
    SETTINGS: ClassVar[dict[str, str]] = {"dps_zeta": "zeta"}

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        setup = self.setup
        x = setup.start(y.shape[0], y.device, noise)
        guidance = DPSGuidance(setup.sde, self.operator, y, self.zeta)
        return sample_reverse_sde(setup.prior_score(), setup.sde, x, setup.grid, noise, setup.denoise_final, guidance)

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations(), prior_backward=self.setup.steps - 1)


@dataclass(frozen=True)
class DDRMSampler(SamplerBase):
    """DDRM on the operator's SVD (:mod:`deftcli.ddrm`)."""

    setup: SamplingSetup
    operator: Operator
    eta: float = DEFAULT_DDRM_ETA
    eta_b: float = DEFAULT_DDRM_ETA_B

    method: ClassVar[SamplerName] = "ddrm"
    SETTINGS: ClassVar[dict[str, str]] = {"ddrm_eta": "eta", "ddrm_eta_b": "eta_b"}

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        setup, svd = self.setup, operator_svd(self.method, self.operator)
        x = setup.start(y.shape[0], y.device, noise)
        return sample_ddrm(
            setup.prior_score(),
            setup.sde,
            svd,
            y,
            self.operator.sigma,
            x,
            setup.grid,
            self.eta,
            self.eta_b,
            noise,
            setup.denoise_final,
        )

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations())


@dataclass(frozen=True)
class DiffPIRSampler(SamplerBase):
    """DiffPIR on the operator's SVD (:mod:`deftcli.diffpir`)."""

    setup: SamplingSetup
    operator: Operator
    lam: float = DEFAULT_DIFFPIR_LAMBDA
    zeta: float = DEFAULT_DIFFPIR_ZETA

    method: ClassVar[SamplerName] = "diffpir"
    SETTINGS: ClassVar[dict[str, str]] = {"diffpir_lambda": "lam", "diffpir_zeta": "zeta"}

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        setup, svd = self.setup, operator_svd(self.method, self.operator)
        x = setup.start(y.shape[0], y.device, noise)
        return sample_diffpir(
            setup.prior_score(),
            setup.sde,
            svd,
            y,
            self.operator.sigma,
            x,
            setup.grid,
            self.lam,
            self.zeta,
            noise,
            setup.denoise_final,
        )

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations())


@dataclass(frozen=True)
class PriorSampler(SamplerBase):
    """Unconditional samples of the prior; as a reconstruction method it ignores y (but for its batch size)."""

    setup: SamplingSetup

    method: ClassVar[SamplerName] = "prior"

    def unconditional(self, n: int, device: torch.device, noise: NoiseSampler) -> Tensor:
        """n samples of the prior."""
        setup = self.setup
        return sample_reverse_sde(
            setup.prior_score(), setup.sde, setup.start(n, device, noise), setup.grid, noise, setup.denoise_final
        )

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        return self.unconditional(y.shape[0], y.device, noise)

    def cost(self) -> Cost:
        return Cost(prior=self.setup.evaluations())


@dataclass(frozen=True)
class BackProjection(SamplerBase):
    """A†y: the operator's pseudo-inverse (or its own back-projection), no network, no noise."""

    operator: Operator

    method: ClassVar[SamplerName] = "dagger"
    deterministic: ClassVar[bool] = True

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        return self.operator.A_dagger(y)

    def cost(self) -> Cost:
        return Cost()


METHODS: tuple[SamplerName, ...] = ("deft", "dps", "ddrm", "diffpir", "prior", "dagger")


def build_sampler(
    method: str,
    setup: SamplingSetup,
    operator: Operator | None = None,
    htransform: HTransform | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Sampler:
    """The sampler of ``method`` with those of ``settings`` (public names, :meth:`Sampler.settings`) that it has
    and that are not None; a one-line error when the method cannot run (no operator, no fine-tuned run, no SVD)."""
    if method not in METHODS:
        raise DeftError(f"unknown method '{method}' (use {', '.join(METHODS)})")
    sampler: Sampler
    if method == "prior":
        sampler = PriorSampler(setup)
    elif operator is None:
        raise DeftError(f"method '{method}' needs a forward operator")
    elif method == "dagger":
        sampler = BackProjection(operator)
    elif method == "deft":
        if htransform is None:
            raise DeftError("method 'deft' needs a fine-tuned run (pass --run DIR or run `deft finetune`)")
        sampler = DeftSampler(setup, operator, htransform)
    elif method == "dps":
        sampler = DPSSampler(setup, operator)
    else:
        operator_svd(method, operator)  # before any sampling or output
        sampler = DDRMSampler(setup, operator) if method == "ddrm" else DiffPIRSampler(setup, operator)
    own = type(sampler).SETTINGS  # type: ignore[attr-defined]
    return sampler.with_settings(
        **{name: value for name, value in (settings or {}).items() if name in own and value is not None}
    )
