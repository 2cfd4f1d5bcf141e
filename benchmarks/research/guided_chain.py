r"""The guided Euler–Maruyama chain of the research samplers, its path KL, and the samplers built on it.

A research sampler is the prior's reverse-SDE chain (:func:`deftcli.samplers.sample_reverse_sde`) with, at
step k, a control u_k added to the prior score and a correction c_k added after the step:

    x_{k+1} = x_k + [½ β_k x_k + β_k (s_θ(x_k, t_k) + u_k)] Δs_k + √(β_k Δs_k) ξ_k + c_k,

so step k shifts the prior chain's mean by d_k = β_k Δs_k u_k + c_k at the prior's covariance β_k Δs_k I,
and the KL divergence of the guided chain's path from the prior chain's is Σ_k ‖d_k‖² / (2 β_k Δs_k).
deft adds u_k = γ h, DPS c_k = −ζ ∇_{x_t} ‖y − A x̂0(x_t)‖, and :class:`LearntScheduleAlongJacobian`
u_k = γ h_J.

A script in ``benchmarks/research/`` imports it as ``guided_chain``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal, Protocol

import torch
from torch import Tensor

from deftcli.htransform import HTransform
from deftcli.methods import Cost, SamplerBase, SamplingSetup
from deftcli.operators import Operator
from deftcli.samplers import NoiseSampler, ReverseStep, ScoreFn, denoise, sample_reverse_sde
from deftcli.sde import VPSDE


def sample_norm(v: Tensor) -> Tensor:
    """‖v_b‖ per batch row, (B, 1, 1, 1), kept away from 0 so that it can divide."""
    return v.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]


class ChainGuidance(Protocol):
    """(score function, x_t, t) → (the prior score s_θ(x_t, t), the control u added to it, the correction c
    added after the step), all detached, for measurements the guidance holds."""

    def __call__(self, score_fn: ScoreFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...


class PathKL:
    """A :class:`ChainGuidance` as :func:`~deftcli.samplers.sample_reverse_sde`'s guidance hook (:meth:`hook`: the
    score s_θ + u and the shift c), and its callback (:meth:`record`) summing ‖d_k‖² / (2 β_k Δs_k) per row into
    :attr:`kl`."""

    def __init__(self, sde: VPSDE, guidance: ChainGuidance, rows: int, device: torch.device) -> None:
        self.sde, self.guidance = sde, guidance
        self.kl = torch.zeros(rows, device=device)
        self._shift: tuple[Tensor, Tensor] | None = None

    def hook(self, score_fn: ScoreFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        score, control, correction = self.guidance(score_fn, x, t)
        self._shift = (control, correction)
        return score + control, correction

    def record(self, step: ReverseStep) -> None:
        assert self._shift is not None
        control, correction = self._shift
        beta_ds = self.sde.beta(step.t)[:, None, None, None] * step.ds
        self.kl += ((beta_ds * control + correction).pow(2) / (2 * beta_ds)).flatten(1).sum(1)


def guided_chain(
    setup: SamplingSetup, guidance: ChainGuidance, n: int, device: torch.device, noise: NoiseSampler
) -> tuple[Tensor, Tensor]:
    """n guided chains from x at t = 1 (:meth:`~deftcli.methods.SamplingSetup.start`) over the setup's grid:
    x_N at t = ε and, per row, the path KL Σ_k ‖d_k‖² / (2 β_k Δs_k) to the prior chain (module docstring)."""
    path = PathKL(setup.sde, guidance, n, device)
    x = sample_reverse_sde(
        setup.prior_score(),
        setup.sde,
        setup.start(n, device, noise),
        setup.grid,
        noise,
        guidance=path.hook,
        callback=path.record,
    )
    return x, path.kl


@dataclass(frozen=True)
class GuidedChainSampler(SamplerBase, ABC):
    """A research sampler (the protocol of :class:`deftcli.methods.Sampler`): :func:`guided_chain` with
    :meth:`steer` as its guidance, then, with the setup's ``denoise_final``, Tweedie's x̂0 at t = ε under
    :meth:`final_score`."""

    setup: SamplingSetup
    operator: Operator

    method: ClassVar[str]

    @abstractmethod
    def steer(self, score_fn: ScoreFn, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The chain's guidance (:class:`ChainGuidance`) for measurements y (one per batch row)."""

    def final_score(self, y: Tensor) -> ScoreFn:
        """The score of the last Tweedie step: the prior's."""
        return self.setup.prior_score()

    def chain(self, y: Tensor, noise: NoiseSampler) -> tuple[Tensor, Tensor]:
        """One chain per row of y: x_N and its path KL (:func:`guided_chain`)."""
        return guided_chain(self.setup, partial(self.steer, y=y), y.shape[0], y.device, noise)

    def finish(self, x: Tensor, y: Tensor) -> Tensor:
        """The sample of a chain's last state x_N: Tweedie's x̂0 with ``denoise_final``, else x_N."""
        return denoise(self.final_score(y), self.setup.sde, x, self.setup.grid[-1]) if self.setup.denoise_final else x

    def sample(self, y: Tensor, noise: NoiseSampler) -> Tensor:
        x, _ = self.chain(y, noise)
        return self.finish(x, y)


@dataclass(frozen=True)
class LearntScheduleAlongJacobian(GuidedChainSampler):
    """deft's learnt schedule along the prior's Jacobian: h_J = −(c_0 + c_ψ(t)) w ‖g‖ d / ‖d‖.

    Jᵀg = ∇_{x_t}⟨x̂0(x_t), g⟩ by autograd through the prior (DPS's cost per step): the direction of the
    likelihood gradient through x̂0(x_t), which the exact h-transform of a non-Gaussian prior carries
    and g lacks, at the magnitude deft's h has. What NN_φ could add by learning that direction.
    With P = A†A the projection onto range(Aᵀ), ``part`` picks d:

    - ``full``: d = Jᵀg;
    - ``range``: d = P Jᵀg, the Jacobian's effect on what y measures;
    - ``null-space``: d = ‖P Jᵀg‖ g/‖g‖ + (I − P) Jᵀg, g's own direction in the range and the
      Jacobian's part that y does not measure.
    """

    htransform: HTransform
    guidance_scale: float = 1.0
    part: Literal["full", "range", "null-space"] = "full"

    method: ClassVar[str] = "along-jacobian"
    SETTINGS: ClassVar[dict[str, str]] = {"guidance_scale": "guidance_scale", "part": "part"}

    def direction(self, g: Tensor, jacobian_g: Tensor) -> Tensor:
        if self.part == "full":
            return jacobian_g
        in_range = self.operator.A_dagger(self.operator.A(jacobian_g))
        if self.part == "range":
            return in_range
        return g / sample_norm(g) * sample_norm(in_range) + (jacobian_g - in_range)

    def steer(self, score_fn: ScoreFn, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The prior score s_θ(x_t, t) and the control γ h_J added to it (no correction)."""
        sde, htransform = self.setup.sde, self.htransform
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            score = score_fn(x_in, t)
            x0 = sde.tweedie_x0(x_in, score, t)
            g = self.operator.likelihood_grad(x0.detach(), y)
            (jacobian_g,) = torch.autograd.grad(x0, x_in, g)
        with torch.no_grad():
            d = self.direction(g, jacobian_g)
            h = -htransform.scale(t) * htransform.weighted(d) * (sample_norm(g) / sample_norm(d))
            return score.detach(), self.guidance_scale * h, torch.zeros_like(x)

    def cost(self) -> Cost:
        """The prior's passes and one backward pass through it per step (the schedule c_ψ is no network pass)."""
        return Cost(prior=self.setup.evaluations(), prior_backward=self.setup.steps - 1)
