r"""Super-resolution: the measurement is the image averaged over f × f blocks.

For an image x (C, H, W) and factor f dividing H and W, y has shape (C, H/f, W/f) and

    (A x)[c, i, j] = 1/f² Σ_{u, v < f} x[c, f i + u, f j + v].

Its adjoint spreads each value over its block, (Aᵀ y)[c, p, q] = y[c, ⌊p/f⌋, ⌊q/f⌋] / f². Since
A Aᵀ = I / f², the Moore–Penrose pseudo-inverse is A† = Aᵀ (A Aᵀ)⁻¹ = f² Aᵀ, i.e. nearest-neighbour
upsampling; A A† = I and A† A is the orthogonal projection onto block-constant images.

SVD (:class:`BlockMeanSVD`): inside every block, the orthonormal 2-D DCT-II basis D ⊗ D of R^{f×f},
whose first vector is the constant 1/f. Since (A x)[c, i, j] = (1/f) ⟨block, 1/f⟩, the singular
value of that coordinate is 1/f and the other f² − 1 coordinates of each block span the null space;
U = I on measurement space. Spectral layout (B, C, f, f, H/f, W/f): coefficient (u, v) of block (i, j).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from deftcli.errors import DeftError
from deftcli.operators import ImageShape, Operator, OperatorParams, SingularValueDecomposition


def dct_matrix(size: int) -> Tensor:
    """The orthonormal DCT-II matrix D (size × size, float64): D[k, p] = c_k cos(π (p + ½) k / size), row 0 constant."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    p = torch.arange(size, dtype=torch.float64)[None, :]
    scale = torch.full((size, 1), math.sqrt(2 / size), dtype=torch.float64)
    scale[0] = math.sqrt(1 / size)
    return scale * torch.cos(math.pi * (p + 0.5) * k / size)


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
            raise DeftError(f"superres factor {factor} does not divide the image size {height}x{width}")
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

    def svd(self) -> "BlockMeanSVD":
        return BlockMeanSVD(self)


class BlockMeanSVD(SingularValueDecomposition):
    """A = U S Vᵀ of the block mean: a DCT basis inside each block (see the module docstring)."""

    def __init__(self, operator: SuperResolution) -> None:
        self.operator = operator
        self.factor = operator.params.factor

    def _basis(self, like: Tensor) -> Tensor:
        return self.operator.constant_like(("dct", self.factor), like, lambda: dct_matrix(self.factor))

    def Vt(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, f, f, H/f, W/f): the DCT coefficients of every block."""
        channels, height, width = self.operator.check_images(x)
        f = self.factor
        blocks = x.reshape(x.shape[0], channels, height // f, f, width // f, f)
        basis = self._basis(x)
        return torch.einsum("up,vq,bcipjq->bcuvij", basis, basis, blocks)

    def V(self, z: Tensor) -> Tensor:
        basis = self._basis(z)
        blocks = torch.einsum("up,vq,bcuvij->bcipjq", basis, basis, z)
        batch, channels, rows, f, cols, _ = blocks.shape
        return blocks.reshape(batch, channels, rows * f, cols * f)

    def Ut(self, y: Tensor) -> Tensor:
        """y (B, C, H/f, W/f) becomes coefficient (0, 0) of every block; the rest are zero."""
        z = y.new_zeros((y.shape[0], y.shape[1], self.factor, self.factor, *y.shape[2:]))
        z[:, :, 0, 0] = y
        return z

    def U(self, z: Tensor) -> Tensor:
        return z[:, :, 0, 0]

    def singular_values(self, image_shape: ImageShape) -> Tensor:
        """1/f for the constant coefficient (0, 0) of each block, 0 for the others: shape (f, f, 1, 1)."""
        self.operator.measurement_shape(image_shape)
        values = torch.zeros(self.factor, self.factor, 1, 1, dtype=torch.float64)
        values[0, 0] = 1 / self.factor
        return values
