r"""The h-transform network and the conditional score it defines (DESIGN.md §1).

Gradient-informed parametrisation, with the detached likelihood gradient
g(x_t, t, y) = Aᵀ(A x̂0 − y) / σ_y²  at Tweedie's x̂0 of the prior:

    h(x_t, t, y) = NN_φ([g, x_t], t) − (c_0(t) + c_ψ(t)) · g

NN_φ is a :class:`~deftcli.unet.UNet` (or, for tiny problems, a :class:`~deftcli.mlp.MLPNet`)
with 2C input channels and output divided by σ(t); c_ψ is a :class:`~deftcli.unet.TimeScaling`.
The fine-tuned score is s_θ + h. Fine-tuned for a likelihood weight w (the tempered posterior
p(x) p(y | x)^w, i.e. σ_y → σ_y/√w), the network takes the unweighted g and uses w g, the gradient of
the tempered likelihood, in both places: h = NN_φ([w g, x_t], t) − (c_0(t) + c_ψ(t)) · w g; w is kept
in its config, so samplers pass g as for any h-network. Submodule names (``cond_model``, ``time_model``) follow the
original code so its two state dicts load as they are.

c_0 is a fixed start (:class:`GaussianGuidance`, no parameters): the exact guidance scale of the
prior's Gaussian approximation, so that h starts as a guided sampler that already fits y at the
noise level σ_y, and fine-tuning learns the correction from there. Without it (c_0 = 0, the
original's choice) h starts at ≈ 0, the prior.

With ``space_to_depth`` r > 1 the UNet works on r×r pixel blocks stacked as channels:
NN_φ(z) = shuffle_r(UNet(unshuffle_r(z))), a UNet with r²·2C inputs and r²·C outputs on an
(H/r)×(W/r) grid. It sees every pixel, covers r× the receptive field, and its cost on a CPU,
which follows the activations of its full-resolution layers, falls by about r²
(``benchmarks/research/results/hnet_cost.json``). r = 1 is the original's network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn
from torch.nn import functional as F

from .checkpoint import load_weights, save_weights
from .errors import DeftError
from .mlp import MLPConfig, MLPNet
from .operators import Operator
from .prior_interface import Prior
from .sde import VPSDE
from .specs import HNetSpec
from .unet import TimeScaling, TimeScalingConfig, UNet, UNetConfig


class GaussianGuidance(BaseModel):
    r"""c_0(t): the h-transform of the prior's Gaussian approximation, for a scalar A Aᵀ.

    For x0 ~ N(μ, v I) and x_t = α x0 + σ ε, x0 | x_t ~ N(x̂0, r_t² I) with

        r_t² = v σ² / (α² v + σ²),   ∂x̂0/∂x_t = J_t I,   J_t = α v / (α² v + σ²),

    so p(y | x_t) = N(y; A x̂0, σ_y² I + r_t² A Aᵀ). With A Aᵀ = λ_A I its score is exactly

        ∇_{x_t} log p(y | x_t) = −c_0(t) g,   c_0(t) = J_t σ_y² / (σ_y² + λ_A r_t²),

    with g the likelihood gradient at x̂0. λ_A = ‖A Aᵀ‖ (:meth:`~deftcli.operators.Operator.gram_norm`)
    makes this exact for super-resolution (A Aᵀ = I/f²) and inpainting (A Aᵀ a projection, λ_A = 1);
    for a blur it is the largest eigenvalue, which under-guides the frequencies the blur damps.
    c_0 → 1 as t → 0 and ≈ 0 at t = 1.
    """

    model_config = ConfigDict(extra="forbid")

    sigma_y: float = Field(gt=0, description="σ_y of the operator's noise")
    gram_norm: float = Field(gt=0, description="λ_A = ‖A Aᵀ‖")
    data_variance: float = Field(gt=0, description="v: the prior's per-pixel variance")

    def scale(self, t: Tensor, sde: VPSDE) -> Tensor:
        """c_0(t) for t (B,) → (B, 1, 1, 1)."""
        alpha, sigma, v = sde.alpha(t), sde.sigma(t), self.data_variance
        denominator = alpha**2 * v + sigma**2
        jacobian, posterior_variance = alpha * v / denominator, v * sigma**2 / denominator
        return (jacobian * self.sigma_y**2 / (self.sigma_y**2 + self.gram_norm * posterior_variance))[
            :, None, None, None
        ]


class HTransformConfig(BaseModel):
    """Architecture of an :class:`HTransform`, stored next to its weights."""

    model_config = ConfigDict(extra="forbid")

    network: Annotated[UNetConfig | MLPConfig, Field(discriminator="kind")]
    time_scaling: TimeScalingConfig
    space_to_depth: int = Field(
        ge=1, description="NN_φ works on r×r pixel blocks stacked as channels (r² · 2C in, r² · C out)"
    )
    guidance: GaussianGuidance | None = Field(description="the fixed start c_0(t); None: c_0 = 0")
    likelihood_weight: float = Field(gt=0, description="w: fine-tuned for p(x) p(y | x)^w; h uses w g")

    @classmethod
    def from_spec(
        cls,
        spec: HNetSpec,
        image_shape: tuple[int, int, int],
        max_period: float,
        guidance: GaussianGuidance | None = None,
        likelihood_weight: float = 1.0,
    ) -> "HTransformConfig":
        channels = image_shape[0]
        r = spec.space_to_depth if spec.architecture == "unet" else 1
        network: UNetConfig | MLPConfig
        if spec.architecture == "mlp":
            network = MLPConfig(
                in_channels=2 * channels,
                out_channels=channels,
                image_size=image_shape[1:],
                hidden=spec.mlp_hidden,
                layers=spec.mlp_layers,
                time_embedding_dim=spec.time_embedding_dim,
                max_period=max_period,
            )
        else:
            network = UNetConfig(
                in_channels=2 * channels * r * r,
                out_channels=channels * r * r,
                model_channels=spec.model_channels,
                channel_mult=spec.channel_mult,
                num_res_blocks=spec.num_res_blocks,
                attention_resolutions=spec.attention_resolutions,
                max_period=max_period,
            )
        return cls(
            network=network,
            time_scaling=TimeScalingConfig(
                time_embedding_dim=spec.time_embedding_dim,
                hidden=spec.time_hidden,
                max_period=max_period,
                init_scale=spec.init_scale,
            ),
            space_to_depth=r,
            guidance=guidance,
            likelihood_weight=likelihood_weight,
        )


class HTransform(nn.Module):
    """h(x_t, t, g) = NN_φ([w g, x_t], t) − (c_0(t) + c_ψ(t)) w g, with w the config's likelihood weight (1 by
    default)."""

    def __init__(self, config: HTransformConfig, sde: VPSDE) -> None:
        super().__init__()
        self.config, self.sde = config, sde
        net = config.network
        self.cond_model = UNet(net, sde.sigma) if isinstance(net, UNetConfig) else MLPNet(net, sde.sigma)
        self.time_model = TimeScaling(config.time_scaling)

    def forward(self, x: Tensor, t: Tensor, g: Tensor) -> Tensor:
        wg = self.weighted(g)
        nn_out = self.network(x, t, wg)
        return nn_out - self.scale(t).to(nn_out.dtype) * wg

    def weighted(self, g: Tensor) -> Tensor:
        """w g: the gradient of the tempered likelihood p(y | x)^w at x̂0."""
        return g if self.config.likelihood_weight == 1.0 else self.config.likelihood_weight * g

    def network(self, x: Tensor, t: Tensor, wg: Tensor) -> Tensor:
        """NN_φ([w g, x_t], t), the learnt part of h beyond the scaled gradient."""
        inputs, r = torch.cat([wg, x], dim=1), self.config.space_to_depth
        return (
            self.cond_model(inputs, t)
            if r == 1
            else F.pixel_shuffle(self.cond_model(F.pixel_unshuffle(inputs, r), t), r)
        )

    def scale(self, t: Tensor) -> Tensor:
        """c_0(t) + c_ψ(t), (B, 1, 1, 1): the scale of the gradient term (c_0 = 0 without a Gaussian start)."""
        scale = self.time_model(t)
        return scale if self.config.guidance is None else scale + self.config.guidance.scale(t, self.sde)

    def run_networks_with(self, adapt: Callable[[Callable[..., Tensor]], Callable[..., Tensor]]) -> None:
        """Evaluate h as ``adapt(forward)`` from now on (mixed precision, compilation:
        :class:`~deftcli.devices.Runtime`); the parameters and the state dict are unchanged."""
        self.forward = adapt(self.forward)  # type: ignore[method-assign]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json"), "parameters": self.num_parameters()}


def build_htransform(
    hnet: HNetSpec,
    image_shape: tuple[int, int, int],
    max_period: float,
    sde: VPSDE,
    prior_parameters: int,
    guidance: GaussianGuidance | None = None,
    likelihood_weight: float = 1.0,
) -> HTransform:
    """The h-network ``hnet`` for a prior's (C, H, W) images, SDE and time-embedding period, with the start c_0
    ``guidance`` and the likelihood weight w; ``model_channels`` None: :func:`auto_channels` for a prior with
    ``prior_parameters`` parameters."""
    r, (_, height, width) = hnet.space_to_depth, image_shape
    if hnet.architecture == "unet" and (height % r or width % r):
        raise DeftError(f"hnet.space_to_depth {r} must divide the prior's image size {height}×{width}")
    if hnet.architecture == "unet":
        where = f"--hnet-mult: the h-network's input (the prior's {height}×{width} images on {r}×{r} blocks)"
        UNetConfig(channel_mult=hnet.channel_mult).check_image_size(height // r, width // r, where)
    if hnet.model_channels is None:
        channels = auto_channels(hnet, image_shape, max_period, sde, prior_parameters)
        hnet = hnet.model_copy(update={"model_channels": channels})
    config = HTransformConfig.from_spec(hnet, tuple(image_shape), max_period, guidance, likelihood_weight)
    return HTransform(config, sde)


def auto_channels(
    hnet: HNetSpec, image_shape: tuple[int, int, int], max_period: float, sde: VPSDE, prior_parameters: int
) -> int:
    """The largest multiple of 4 channels whose h-network has at most ``size_fraction`` of the prior's parameters
    (the paper's h-networks are 4–9 % of their priors); 16 for a prior without parameters (analytic)."""
    budget = hnet.size_fraction * prior_parameters
    if budget == 0:
        return 16
    best = 4
    for channels in range(4, 257, 4):
        sized = hnet.model_copy(update={"model_channels": channels})
        if HTransform(HTransformConfig.from_spec(sized, tuple(image_shape), max_period), sde).num_parameters() > budget:
            break
        best = channels
    return best


def guidance_inputs(prior: Prior, operator: Operator, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The prior score s_θ(x, t) and the detached likelihood gradient g at Tweedie's x̂0 (no autograd)."""
    with torch.no_grad():
        score = prior.score(x, t)
        g = operator.likelihood_grad(prior.sde.tweedie_x0(x, score, t), y)
    return score, g


class ConditionalScore:
    r"""The fine-tuned score s_θ(x, t) + γ h(x, t, g) for measurements y (one per batch row), as a score function.

    γ = 1 (the default) is the fine-tuned posterior (for an h-network fine-tuned with likelihood weight
    w: the tempered posterior p(x) p(y | x)^w, learnt). Since h ≈ ∇ log p_t(y | x_t)^w, a guidance scale
    γ ≠ 1 samples approximately p(x) p(y | x)^(γw), i.e. σ_y → σ_y / √(γw). This is the same
    approximation as a classifier-guidance scale. γ = 0 is the prior.
    """

    def __init__(
        self, prior: Prior, htransform: HTransform, operator: Operator, y: Tensor, guidance_scale: float = 1.0
    ) -> None:
        self.prior, self.htransform, self.operator, self.y = prior, htransform, operator, y
        self.guidance_scale = guidance_scale
        self.last: tuple[Tensor, Tensor] | None = None
        """(g, h) of the latest evaluation, for a sampler's per-step callback (the fine-tuning rollout's RND terms)."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        score, g = guidance_inputs(self.prior, self.operator, x, t, self.y)
        with torch.no_grad():
            h = self.htransform(x, t, g)
            self.last = (g, h)
            return score + self.guidance_scale * h


def save_htransform(htransform: HTransform, path: Path, info: dict[str, Any]) -> None:
    metadata = {"htransform_config": htransform.config.model_dump_json(), "info": json.dumps(info)}
    save_weights(htransform.state_dict(), path, metadata=metadata)


def load_htransform(path: Path, prior: Prior) -> tuple[HTransform, dict[str, Any]]:
    """An h-network from its safetensors file (config in the metadata)."""
    tensors, metadata = load_weights(path)
    if "htransform_config" not in metadata:
        raise DeftError(f"{path}: not an h-transform checkpoint (no config in its metadata)")
    try:
        config = HTransformConfig.model_validate_json(metadata["htransform_config"])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise DeftError(f"{path}: h-transform config in its metadata is invalid ({where}: {err['msg']})") from None
    htransform = HTransform(config, prior.sde)
    expected = set(htransform.state_dict())
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        raise DeftError(f"{path}: checkpoint does not match its config (missing {missing})")
    try:
        htransform.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise DeftError(f"{path}: checkpoint does not match its config ({str(exc).splitlines()[0]})") from None
    return htransform, json.loads(metadata.get("info", "{}"))
