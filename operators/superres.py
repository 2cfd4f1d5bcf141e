r"""Super-resolution: the measurement is the image averaged over f × f blocks.

For an image x (C, H, W) and factor f dividing H and W, y has shape (C, H/f, W/f) and

    (A x)[c, i, j] = 1/f² Σ_{u, v < f} x[c, f i + u, f j + v].

Its adjoint spreads each value over its block, (Aᵀ y)[c, p, q] = y[c, ⌊p/f⌋, ⌊q/f⌋] / f². Since
A Aᵀ = I / f², the Moore–Penrose pseudo-inverse is A† = Aᵀ (A Aᵀ)⁻¹ = f² Aᵀ, i.e. nearest-neighbour
upsampling; A A† = I and A† A is the orthogonal projection onto block-constant images.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from deftcli.errors import DeftError
from deftcli.operators import ImageShape, Operator, OperatorParams


class SuperResolution(Operator):
    """Block-average downsampling by an integer factor (see the module docstring)."""

    name = "superres"

    class Params(OperatorParams):
        factor: int = Field(
            4, ge=2, description="downsampling factor f (integer >= 2) that divides the image height and width"
        )

    params: Params

    def measurement_shape(self, image_shape: ImageShape) -> ImageShape:
        channels, height, width = image_shape
        factor = self.params.factor
        if height % factor or width % factor:
            raise DeftError(
                f"superres factor {factor} does not divide the image size {height}x{width}"
            )
        return channels, height // factor, width // factor

    def A(self, x: Tensor) -> Tensor:
        """Mean over f × f blocks: (B, C, H, W) → (B, C, H/f, W/f)."""
        channels, height, width = self.check_images(x)
        factor = self.params.factor
        blocks = x.reshape(x.shape[0], channels, height // factor, factor, width // factor, factor)
        return blocks.mean(dim=(3, 5))

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Aᵀ y: every value copied over its f × f block and divided by f²."""
        return self.A_dagger(y) / self.params.factor**2

    def A_dagger(self, y: Tensor) -> Tensor:
        """A† y = f² Aᵀ y: nearest-neighbour upsampling, the exact pseudo-inverse."""
        factor = self.params.factor
        return y.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
