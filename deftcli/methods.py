r"""Reconstruction methods as samplers over the same Euler–Maruyama loop.

- ``deft``: the fine-tuned score s_θ + γ h (:class:`~deftcli.htransform.ConditionalScore`; γ = 1 is
  the fine-tuned posterior, γ > 1 a sharper likelihood), integrated by the ``sde`` sampler or the
  ``renoise`` sampler with fresh-noise fraction ζ (:mod:`deftcli.samplers`);
- ``dps``: diffusion posterior sampling (Chung et al. 2023): after each prior reverse-SDE step,
  x ← x − ζ ∇_{x_t} ‖y − A x̂0(x_t)‖ (autograd through the prior);
- ``ddrm``: denoising diffusion restoration models (Kawar et al. 2022, :mod:`deftcli.ddrm`) and
  ``diffpir``: diffusion plug-and-play restoration (Zhu et al. 2023, :mod:`deftcli.diffpir`), both on the
  operator's SVD (:meth:`~deftcli.operators.Operator.svd`), the prior's score and the same time grid;
- ``prior``: unconditional samples of the prior (ignores y);
- ``dagger``: the back-projection A†y (deterministic, no network).

Each returns samples (B, C, H, W) for measurements (B, …) and counts network evaluations per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ddrm import sample_ddrm
from .diffpir import sample_diffpir
from .errors import DeftError
from .htransform import ConditionalScore, HTransform
from .operators import Operator, SingularValueDecomposition
from .priors import Prior
from .samplers import (
    NoiseSource, SamplerKind, ScoreFn, clip_denoised, denoise, gaussian, reverse_sde_step, run_sampler, sample_reverse_sde, standard_noise, time_batch,
)
from .sde import VPSDE, reverse_time_grid
from .specs import (DEFAULT_DDRM_ETA, DEFAULT_DDRM_ETA_B, DEFAULT_DIFFPIR_LAMBDA, DEFAULT_DIFFPIR_ZETA,
                    DEFAULT_DPS_ZETA, SPECTRAL_METHODS, SamplerName)

METHODS: tuple[SamplerName, ...] = ("deft", "dps", "ddrm", "diffpir", "prior", "dagger")


def operator_svd(method: str, operator: Operator) -> SingularValueDecomposition:
    """The operator's SVD for a spectral method, or a one-line error naming the operator that has none."""
    svd = operator.svd()
    if svd is None:
        raise DeftError(f"method '{method}' needs the operator's singular value decomposition, "
                        f"and operator '{operator.name}' provides none (its svd() returns None)")
    return svd
DETERMINISTIC = ("dagger",)
"""Methods whose output does not depend on the noise: one output per measurement, no spread to calibrate."""


@dataclass
class Cost:
    """Network evaluations per sample: prior forward passes, h-network passes, and whether DPS backpropagates."""

    prior: int = 0
    hnet: int = 0
    prior_backward: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"nfe_prior": self.prior, "nfe_hnet": self.hnet, "backward_prior": self.prior_backward}


@dataclass
class Reconstructor:
    """Everything a method needs besides the measurements."""

    prior: Prior
    operator: Operator | None = None
    htransform: HTransform | None = None
    steps: int = 100
    denoise_final: bool = True
    clip_x0: bool = False
    dps_zeta: float = DEFAULT_DPS_ZETA
    guidance_scale: float = 1.0
    sampler: SamplerKind = "sde"
    renoise_zeta: float = 1.0
    diffpir_lambda: float = DEFAULT_DIFFPIR_LAMBDA
    diffpir_zeta: float = DEFAULT_DIFFPIR_ZETA
    ddrm_eta: float = DEFAULT_DDRM_ETA
    ddrm_eta_b: float = DEFAULT_DDRM_ETA_B

    @property
    def grid(self) -> list[float]:
        return reverse_time_grid(self.steps)

    def prior_score(self) -> ScoreFn:
        return clip_denoised(self.prior.score, self.prior.sde) if self.clip_x0 else self.prior.score

    def unconditional(self, n: int, device: torch.device, generator: NoiseSource) -> Tensor:
        """n samples of the prior."""
        x = gaussian((n, *self.prior.image_shape), generator, device)
        return sample_reverse_sde(self.prior_score(), self.prior.sde, x, self.grid, generator, self.denoise_final)

    def cost(self, method: str) -> Cost:
        n = self.steps - 1 + int(self.denoise_final)
        if method == "deft":
            return Cost(prior=n, hnet=n)
        if method == "dps":
            return Cost(prior=n, prior_backward=self.steps - 1)
        if method in ("prior", *SPECTRAL_METHODS):
            return Cost(prior=n)
        return Cost()

    def settings(self, method: str) -> dict[str, float]:
        """The method's own knobs, for the record: γ, the run's likelihood weight w and the sampler for deft, ζ for DPS,
        λ and ζ for DiffPIR, η and η_b for DDRM."""
        if method == "deft":
            weight = self.htransform.config.likelihood_weight if self.htransform is not None else 1.0
            sampler = {"sampler": self.sampler, **({"renoise_zeta": self.renoise_zeta} if self.sampler == "renoise" else {})}
            return {"guidance_scale": self.guidance_scale, "likelihood_weight": weight, **sampler}
        fields = {"dps": ("dps_zeta",), "diffpir": ("diffpir_lambda", "diffpir_zeta"),
                  "ddrm": ("ddrm_eta", "ddrm_eta_b")}
        return {field: getattr(self, field) for field in fields.get(method, ())}

    def sample(self, method: str, y: Tensor, generator: NoiseSource) -> Tensor:
        """One sample per row of y (B, …) → (B, C, H, W)."""
        if method == "prior":
            return self.unconditional(y.shape[0], y.device, generator)
        if self.operator is None:
            raise DeftError(f"method '{method}' needs a forward operator")
        if method == "dagger":
            return self.operator.A_dagger(y)
        x = gaussian((y.shape[0], *self.prior.image_shape), generator, y.device)
        if method == "deft":
            if self.htransform is None:
                raise DeftError("method 'deft' needs a fine-tuned run (pass --run DIR or run `deft finetune`)")
            score = ConditionalScore(self.prior, self.htransform, self.operator, y, self.guidance_scale)
            if self.clip_x0:
                score = clip_denoised(score, self.prior.sde)
            return run_sampler(self.sampler, score, self.prior.sde, x, self.grid, self.renoise_zeta, generator, self.denoise_final)
        if method == "dps":
            return sample_dps(self.prior_score(), self.prior, self.operator, y, x, self.grid, self.dps_zeta, generator, self.denoise_final)
        if method == "ddrm":
            svd = operator_svd(method, self.operator)
            return sample_ddrm(self.prior_score(), self.prior.sde, svd, y, self.operator.sigma, x, self.grid,
                               self.ddrm_eta, self.ddrm_eta_b, generator, self.denoise_final)
        if method == "diffpir":
            svd = operator_svd(method, self.operator)
            return sample_diffpir(self.prior_score(), self.prior.sde, svd, y, self.operator.sigma, x, self.grid,
                                  self.diffpir_lambda, self.diffpir_zeta, generator, self.denoise_final)
        raise DeftError(f"unknown method '{method}' (use {', '.join(METHODS)})")


def sample_dps(
    score_fn: ScoreFn,
    prior: Prior,
    operator: Operator,
    y: Tensor,
    x: Tensor,
    grid: Sequence[float],
    zeta: float,
    generator: NoiseSource,
    denoise_final: bool,
) -> Tensor:
    """DPS: the prior's reverse-SDE step followed by x ← x − ζ ∇_{x_t} ‖y − A x̂0(x_t)‖ per sample."""
    sde = prior.sde
    for k in range(len(grid) - 1):
        t = time_batch(grid[k], x)
        score, correction = dps_correction(score_fn, sde, operator, y, x, t, zeta)
        with torch.no_grad():
            x = reverse_sde_step(sde, x, t, grid[k + 1] - grid[k], score, standard_noise(x, generator)) + correction
    return denoise(score_fn, sde, x, grid[-1]) if denoise_final else x


def dps_correction(score_fn: ScoreFn, sde: VPSDE, operator: Operator, y: Tensor, x: Tensor, t: Tensor, zeta: float) -> tuple[Tensor, Tensor]:
    """The prior score s_θ(x_t, t) and DPS's shift −ζ ∇_{x_t} ‖y − A x̂0(x_t)‖ of the step from x_t, both detached.

    ∇_{x_t} goes through Tweedie's x̂0(x_t) = (x_t + σ² s_θ(x_t, t))/α, i.e. one backward pass of the prior.
    """
    x_in = x.detach().requires_grad_(True)
    with torch.enable_grad():
        score = score_fn(x_in, t)
        residual = (y - operator.A(sde.tweedie_x0(x_in, score, t))).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(residual.sum(), x_in)
    return score.detach(), -zeta * grad
