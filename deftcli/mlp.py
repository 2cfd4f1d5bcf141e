"""A small time-conditioned MLP for image-shaped problems of low dimension (e.g. the 1×8×8 exact check).

Same contract as :class:`~deftcli.unet.UNet`: (x, t) → output with the image shape of
``out_channels``, divided by σ(t). The input is flattened and concatenated with a sinusoidal
embedding of t; hidden layers use SiLU; the last layer starts at zero.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from .unet import timestep_embedding


class MLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp"] = "mlp"
    in_channels: int = Field(ge=1)
    out_channels: int = Field(ge=1)
    image_size: tuple[int, int]
    hidden: int = Field(256, ge=1)
    layers: int = Field(3, ge=1)
    time_embedding_dim: int = Field(64, ge=2)
    max_period: float = Field(0.005, gt=0)


class MLPNet(nn.Module):
    """MLP([flatten(x), emb(t)]) reshaped to (B, out_channels, H, W), divided by σ(t)."""

    def __init__(self, config: MLPConfig, sigma_fn: Callable[[Tensor], Tensor] | None) -> None:
        super().__init__()
        self.config = config
        self.sigma_fn = sigma_fn
        h, w = config.image_size
        width = config.in_channels * h * w + config.time_embedding_dim
        layers: list[nn.Module] = []
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden), nn.SiLU()]
            width = config.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.out_channels * h * w)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.config.time_embedding_dim, self.config.max_period).to(x.dtype)
        out = self.head(self.body(torch.cat([x.flatten(1), emb], dim=1)))
        out = out.reshape(x.shape[0], self.config.out_channels, *self.config.image_size)
        return out if self.sigma_fn is None else out / self.sigma_fn(t).to(out.dtype)[:, None, None, None]
