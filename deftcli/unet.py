r"""The UNet of the original research code, state-dict compatible, and the time-scaling network c_ψ(t).

The parameter names and shapes match the original ``UNetModel`` (guided-diffusion lineage) for the
same configuration, so its checkpoints load with ``strict=True``. The network is time-conditioned
through a sinusoidal embedding of t ∈ [0, 1] with ``max_period`` (0.005 in the original: the
frequencies grow up to 1/max_period) and its output is divided by σ(t), so for a prior it
predicts the score s_θ(x, t) ≈ −ε/σ(t).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import DeftError


class UNetConfig(BaseModel):
    """Architecture of a :class:`UNet` (the keys of the original ``report.yaml`` ``model`` section)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["unet"] = "unet"
    in_channels: int = Field(3, ge=1)
    out_channels: int = Field(3, ge=1)
    model_channels: int = Field(32, ge=1, le=1024)
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = Field(1, ge=1)
    attention_resolutions: tuple[int, ...] = ()
    max_period: float = Field(0.005, gt=0)
    num_heads: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups; gcd(channels, norm_groups) is used")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in UNet(self, sigma_fn=None).parameters())

    def check_image_size(self, height: int, width: int, what: str) -> None:
        """The network halves the resolution len(channel_mult) − 1 times, so H and W must be multiples of
        2^(len(channel_mult) − 1); otherwise its skip connections do not line up (a DeftError naming ``what``)."""
        step = 2 ** (len(self.channel_mult) - 1)
        if height % step or width % step:
            raise DeftError(
                f"{what}: {height}×{width} does not fit a UNet with {len(self.channel_mult)} levels "
                f"(channel_mult {','.join(map(str, self.channel_mult))}): the size must be a multiple of {step}"
            )


def timestep_embedding(t: Tensor, dim: int, max_period: float) -> Tensor:
    """Sinusoidal embedding [cos(t ω_i), sin(t ω_i)] with ω_i = max_period^(−i/half), i < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNormAct(nn.GroupNorm):
    """GroupNorm computed in float32, optionally followed by SiLU.

    The SiLU is applied in place on the normalised tensor, which nothing else holds (autograd saves
    SiLU's output for its backward, so this is exact with gradients too); it saves one activation-sized
    allocation per layer.
    """

    def __init__(self, channels: int, groups: int, act: bool) -> None:
        super().__init__(num_groups=math.gcd(channels, groups), num_channels=channels)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x.float()).to(x.dtype)
        return F.silu(y, inplace=True) if self.act else y


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class ResBlock(nn.Module):
    """h = conv(act(norm(x))) + emb; h = conv(dropout(act(norm(h)))); return skip(x) + h."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNormAct(channels, groups, act=True), nn.Identity(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNormAct(out_channels, groups, act=True),
            nn.Identity(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Single- or multi-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNormAct(channels, groups, act=False)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))
        length = qkv.shape[-1]
        q, k, v = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, length).chunk(3, dim=1)
        scale = (c // self.num_heads) ** -0.25
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1).to(q.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
        return x + self.proj_out(a).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A sequence of blocks that each receive the time embedding; optionally gradient-checkpointed."""

    use_checkpoint: bool = False

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, nn.Conv2d):
                x = layer(x)
            elif self.use_checkpoint and torch.is_grad_enabled() and isinstance(layer, (ResBlock, AttentionBlock)):
                x = checkpoint(layer, x, emb, use_reentrant=False)
            else:
                x = layer(x, emb)
        return x


class UNet(nn.Module):
    """UNet(x, t) / σ(t), with the original's module layout.

    ``sigma_fn`` is σ(t) of the SDE (``None`` builds the bare network, e.g. to count parameters).
    """

    def __init__(self, config: UNetConfig, sigma_fn: Callable[[Tensor], Tensor] | None) -> None:
        super().__init__()
        self.config = config
        self.sigma_fn = sigma_fn
        mc, groups, drop = config.model_channels, config.norm_groups, config.dropout
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = config.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, drop, groups)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.num_heads, groups))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(
            ResBlock(ch, emb_dim, ch, drop, groups),
            AttentionBlock(ch, config.num_heads, groups),
            ResBlock(ch, emb_dim, ch, drop, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, drop, groups)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.num_heads, groups))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNormAct(ch, groups, act=True), nn.Identity(), _zero(nn.Conv2d(ch, config.out_channels, 3, padding=1))
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute block activations in the backward pass instead of storing them."""
        for module in self.modules():
            if isinstance(module, EmbedSequential):
                module.use_checkpoint = enabled

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, C_in, H, W), t: (B,) → (B, C_out, H, W), divided by σ(t) when the SDE is known."""
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels, self.config.max_period).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h)
        if self.sigma_fn is None:
            return out
        return out / self.sigma_fn(t).to(out.dtype)[:, None, None, None]


class TimeScalingConfig(BaseModel):
    """Architecture of :class:`TimeScaling` (the original ``ScaleModel``)."""

    model_config = ConfigDict(extra="forbid")

    time_embedding_dim: int = Field(256, ge=2)
    hidden: int = Field(256, ge=1)
    max_period: float = Field(0.005, gt=0)
    init_scale: float = Field(5e-3, description="initial bias of the last layer")


class TimeScaling(nn.Module):
    r"""c_ψ(t) = (1 − t) · SiLU(MLP(emb(t))): the scale of the likelihood-gradient term of the h-transform.

    The last layer starts at zero weight and bias ``init_scale``, so c_ψ starts near
    SiLU(init_scale)·(1 − t) ≈ init_scale/2 · (1 − t) and vanishes at t = 1.
    Returns shape (B, 1, 1, 1).
    """

    def __init__(self, config: TimeScalingConfig) -> None:
        super().__init__()
        self.config = config
        self.linear1 = nn.Linear(config.time_embedding_dim, config.hidden)
        self.linear2 = nn.Linear(config.hidden, config.hidden)
        self.linear3 = nn.Linear(config.hidden, 1)
        with torch.no_grad():
            self.linear3.weight.zero_()
            self.linear3.bias.fill_(config.init_scale)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.config.time_embedding_dim, self.config.max_period)
        h = F.silu(self.linear1(emb))
        h = F.silu(self.linear2(h))
        h = F.silu(self.linear3(h))
        return ((1 - t.float())[:, None] * h)[:, :, None, None]
