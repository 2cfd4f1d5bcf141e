r"""Inpainting: the measurement keeps the observed pixels and zeroes the missing ones.

With a binary mask M (H, W) (1 = observed), shared by all channels,

    A x = M ⊙ x,     y has the image's shape (C, H, W).

A is an orthogonal projection (diagonal with entries 0 and 1), so Aᵀ = A and its pseudo-inverse is
A† = A: A† y = M ⊙ y, the measurement with its missing pixels at 0. Its SVD (:class:`MaskSVD`) is
the pixel basis: V = U = I, singular values M ∈ {0, 1}, spectral layout = the image itself.

Masks (``mask``):
- ``box``: a centred missing box of round(f H) × round(f W) pixels, f = ``box_fraction``;
- ``random``: each pixel missing independently with probability ``missing_fraction``, drawn from
  ``torch.rand`` on a CPU generator seeded with ``mask_seed`` (the same mask on every machine);
- a path to a mask image of exactly the image's size: white (gray level > 0.5) = observed.
Box and random masks are made for whatever image size the operator is applied to.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from deftcli.errors import DeftError
from deftcli.operators import ImageShape, Operator, OperatorParams, SingularValueDecomposition, read_grayscale_image

NAMED_MASKS = ("box", "random")


class Inpaint(Operator):
    """Pixel mask M ⊙ x with a box, random or image mask (see the module docstring)."""

    name = "inpaint"

    class Params(OperatorParams):
        mask: str = Field(
            "box",
            description="'box', 'random', or the path of a mask image of the image's size (white = observed)",
        )
        box_fraction: float = Field(
            0.5, ge=0, le=1, description="side of the centred missing box as a fraction of the image side"
        )
        missing_fraction: float = Field(
            0.7, ge=0, le=1, description="probability that a pixel is missing in a random mask"
        )
        mask_seed: int = Field(
            0, ge=0, le=2**63 - 1, description="seed of the random mask (the same mask on every machine)"
        )

    params: Params

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.mask_image: Tensor | None = None
        if params.mask not in NAMED_MASKS:
            self.mask_image = read_grayscale_image(params.mask, "inpaint mask", NAMED_MASKS) > 0.5
        self._observed: dict[
            tuple[int, int], Tensor
        ] = {}  # checked masks by image size: A checks its input on every call

    def parameter_files(self) -> dict[str, Path]:
        return {} if self.params.mask in NAMED_MASKS else {"mask": Path(self.params.mask).expanduser()}

    def measurement_shape(self, image_shape: ImageShape) -> ImageShape:
        _, height, width = image_shape
        self.observed_mask(height, width)  # the mask must fit the image and observe something
        return image_shape

    def observed_mask(self, height: int, width: int) -> Tensor:
        """The boolean (H, W) CPU mask M of an H × W image, True where a pixel is observed (made and checked once per
        size)."""
        if (height, width) not in self._observed:
            self._observed[height, width] = self._checked_mask(height, width)
        return self._observed[height, width]

    def _checked_mask(self, height: int, width: int) -> Tensor:
        if self.mask_image is not None:
            if tuple(self.mask_image.shape) != (height, width):
                mask_height, mask_width = self.mask_image.shape
                raise DeftError(
                    f"inpaint mask '{self.params.mask}' is {mask_height}x{mask_width} but the image is {height}x{width}"
                )
            observed = self.mask_image
        elif self.params.mask == "random":
            generator = torch.Generator().manual_seed(self.params.mask_seed)
            observed = torch.rand(height, width, generator=generator) >= self.params.missing_fraction
        else:
            observed = torch.ones(height, width, dtype=torch.bool)
            box_height = round(self.params.box_fraction * height)
            box_width = round(self.params.box_fraction * width)
            top, left = (height - box_height) // 2, (width - box_width) // 2
            observed[top : top + box_height, left : left + box_width] = False
        if not observed.any():
            raise DeftError(
                f"inpaint mask {self.params.mask!r} observes no pixel of a {height}x{width} image: "
                "there is nothing to condition on"
            )
        return observed

    def A(self, x: Tensor) -> Tensor:
        """A x = M ⊙ x (the mask broadcast over batch and channels)."""
        _, height, width = self.check_images(x)
        mask = self.constant_like(("observed_mask", height, width), x, lambda: self.observed_mask(height, width))
        return x * mask

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Aᵀ y = M ⊙ y (A is symmetric)."""
        return self.A(y)

    def A_dagger(self, y: Tensor) -> Tensor:
        """A† y = M ⊙ y (A is an orthogonal projection, its own pseudo-inverse)."""
        return self.A(y)

    def svd(self) -> "MaskSVD":
        return MaskSVD(self)


class MaskSVD(SingularValueDecomposition):
    """A = U S Vᵀ of the mask: V = U = I and S = M (the pixel basis)."""

    def __init__(self, operator: Inpaint) -> None:
        self.operator = operator

    def Vt(self, x: Tensor) -> Tensor:
        self.operator.check_images(x)
        return x

    def V(self, z: Tensor) -> Tensor:
        return z

    def Ut(self, y: Tensor) -> Tensor:
        """M ⊙ y: the unobserved pixels, where s = 0, are zero."""
        return self.operator.A(y)

    def U(self, z: Tensor) -> Tensor:
        return z

    def singular_values(self, image_shape: ImageShape) -> Tensor:
        """The mask M as 0/1, shape (H, W)."""
        _, height, width = image_shape
        return self.operator.observed_mask(height, width).to(torch.float64)
