r"""Deblurring: the measurement is the image convolved circularly with a normalised kernel.

For a kernel k of size kh × kw (centre r = (⌊kh/2⌋, ⌊kw/2⌋), Σ k = 1) and an image x (C, H, W)
treated as periodic, every channel is blurred with the same kernel:

    (A x)[c, i, j] = Σ_{u, v} k[u, v] x[c, (i − u + r_0) mod H, (j − v + r_1) mod W].

A is a circulant (square) matrix, diagonalised by the 2-D DFT 𝓕: A x = 𝓕⁻¹(K · 𝓕x), where the
transfer function K = 𝓕k̃ is the DFT of the kernel wrapped onto the H × W torus with its centre at
the origin (taps further than the image size wrap around and add up). Hence the exact adjoint is
Aᵀ y = 𝓕⁻¹(conj(K) · 𝓕y), the convolution with the flipped kernel.

A† is the Tikhonov-regularised (Wiener) inverse for a white signal of unit variance,

    A† y = 𝓕⁻¹( conj(K) / (|K|² + ε) · 𝓕y ) = (AᵀA + ε I)⁻¹ Aᵀ y,   ε = max(σ_y², 10⁻³),

which inverts the frequencies the blur keeps and damps those it removes (its gain is at most
1 / (2√ε) ≈ 16 for σ_y = 0).

SVD (:class:`FourierSVD`): with the unitary 2-D DFT 𝓕 (norm "ortho") and K = |K| e^{iφ} on the
full H × W frequency grid, A = 𝓕⁻¹ K 𝓕 = U S Vᵀ with Vᵀ = 𝓕, S = |K| and U = 𝓕⁻¹ e^{iφ}
(e^{iφ} = 1 where K = 0). The spectral layout (B, C, H, W) is complex and Hermitian symmetric for
real images.

Kernels: ``gaussian`` k[u, v] ∝ exp(−((u − r)² + (v − r)²) / (2 s²)) of size ``kernel_size`` and
std s = ``kernel_std``; ``uniform`` a ``kernel_size`` × ``kernel_size`` box; otherwise the gray
levels of a kernel image file (any size, centre at (⌊kh/2⌋, ⌊kw/2⌋)). All are normalised to sum 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from torch import Tensor

from deftcli.errors import DeftError
from deftcli.operators import ImageShape, Operator, OperatorParams, SingularValueDecomposition, read_grayscale_image

NAMED_KERNELS = ("gaussian", "uniform")
MIN_TIKHONOV_EPS = 1e-3


class Blur(Operator):
    """Circular convolution with a Gaussian, uniform or image kernel (see the module docstring)."""

    name = "blur"

    class Params(OperatorParams):
        kernel: str = Field(
            "gaussian",
            description="'gaussian', 'uniform', or the path of a grayscale kernel image (normalised to sum 1)",
        )
        kernel_size: int = Field(9, ge=1, le=1025, description="side of the gaussian or uniform kernel in pixels (odd)")
        kernel_std: float = Field(2.0, gt=0, description="std of the gaussian kernel in pixels (gaussian only)")

        @field_validator("kernel_size")
        @classmethod
        def _odd(cls, kernel_size: int) -> int:
            if kernel_size % 2 == 0:
                raise PydanticCustomError("odd_kernel_size", "must be odd so the kernel has a centre")
            return kernel_size

    params: Params

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.kernel = self._build_kernel(params)

    def parameter_files(self) -> dict[str, Path]:
        return {} if self.params.kernel in NAMED_KERNELS else {"kernel": Path(self.params.kernel).expanduser()}

    @staticmethod
    def _build_kernel(params: Params) -> Tensor:
        """The (kh, kw) float64 CPU kernel, normalised to sum 1."""
        if params.kernel == "gaussian":
            offsets = torch.arange(params.kernel_size, dtype=torch.float64) - params.kernel_size // 2
            profile = torch.exp(-(offsets**2) / (2 * params.kernel_std**2))
            kernel = torch.outer(profile, profile)
        elif params.kernel == "uniform":
            kernel = torch.ones(params.kernel_size, params.kernel_size, dtype=torch.float64)
        else:
            kernel = read_grayscale_image(params.kernel, "blur kernel", NAMED_KERNELS)
            if kernel.sum() == 0:
                raise DeftError(f"blur kernel image '{params.kernel}' is entirely black")
        return kernel / kernel.sum()

    @property
    def tikhonov_eps(self) -> float:
        """ε = max(σ_y², 10⁻³) of the regularised inverse A†."""
        return max(self.sigma**2, MIN_TIKHONOV_EPS)

    def measurement_shape(self, image_shape: ImageShape) -> ImageShape:
        return image_shape

    def transfer_function(self, height: int, width: int) -> Tensor:
        """K = rfft2 of the kernel wrapped onto the H × W torus with its centre at the origin,
        complex128 on the CPU, shape (H, W // 2 + 1)."""
        return torch.fft.rfft2(self.wrapped_kernel(height, width))

    def wrapped_kernel(self, height: int, width: int) -> Tensor:
        """The kernel wrapped onto the H × W torus with its centre at the origin, float64 on the CPU."""
        kernel_height, kernel_width = self.kernel.shape
        rows = (torch.arange(kernel_height) - kernel_height // 2) % height
        cols = (torch.arange(kernel_width) - kernel_width // 2) % width
        wrapped = torch.zeros(height, width, dtype=torch.float64)
        wrapped.index_put_(
            (rows[:, None].expand_as(self.kernel), cols[None, :].expand_as(self.kernel)),
            self.kernel,
            accumulate=True,
        )
        return wrapped

    def _filter(self, images: Tensor, response: Callable[[Tensor], Tensor]) -> Tensor:
        """𝓕⁻¹(response(K) · 𝓕 images), computed in float64 for float64 images and in float32
        otherwise, on the images' device."""
        _, height, width = self.check_images(images)
        real_dtype = images.dtype if images.dtype == torch.float64 else torch.float32
        spectrum = torch.fft.rfft2(images.to(real_dtype))
        transfer = self.constant_like(
            ("transfer_function", height, width), spectrum, lambda: self.transfer_function(height, width)
        )
        filtered = torch.fft.irfft2(spectrum * response(transfer), s=(height, width))
        return filtered.to(images.dtype)

    def A(self, x: Tensor) -> Tensor:
        """A x = 𝓕⁻¹(K · 𝓕x): circular convolution with the kernel."""
        return self._filter(x, lambda transfer: transfer)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Aᵀ y = 𝓕⁻¹(conj(K) · 𝓕y): circular convolution with the flipped kernel."""
        return self._filter(y, torch.conj)

    def A_dagger(self, y: Tensor) -> Tensor:
        """A† y = 𝓕⁻¹(conj(K) / (|K|² + ε) · 𝓕y) = (AᵀA + ε I)⁻¹ Aᵀ y, ε = :attr:`tikhonov_eps`."""
        eps = self.tikhonov_eps
        return self._filter(y, lambda transfer: transfer.conj() / (transfer.abs() ** 2 + eps))

    def svd(self) -> "FourierSVD":
        return FourierSVD(self)


class FourierSVD(SingularValueDecomposition):
    """A = U S Vᵀ of the circular blur in the unitary Fourier basis (see the module docstring)."""

    def __init__(self, operator: Blur) -> None:
        self.operator = operator

    def _spectrum(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """|K| and the phase e^{iφ} (1 where K = 0) on the full H × W grid, complex128 on the CPU."""
        transfer = torch.fft.fft2(self.operator.wrapped_kernel(height, width))
        magnitude = transfer.abs()
        phase = torch.where(magnitude > 0, transfer / magnitude.clamp_min(1e-300), torch.ones_like(transfer))
        return magnitude, phase

    def _phase(self, like: Tensor) -> Tensor:
        height, width = like.shape[-2:]
        return self.operator.constant_like(("phase", height, width), like, lambda: self._spectrum(height, width)[1])

    @staticmethod
    def _fft_input(x: Tensor) -> Tensor:
        return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)

    def Vt(self, x: Tensor) -> Tensor:
        self.operator.check_images(x)
        return torch.fft.fft2(self._fft_input(x), norm="ortho")

    def V(self, z: Tensor) -> Tensor:
        return torch.fft.ifft2(z, norm="ortho").real

    def Ut(self, y: Tensor) -> Tensor:
        spectrum = torch.fft.fft2(self._fft_input(y), norm="ortho")
        phase = self._phase(spectrum)
        observed = self.singular_values_like(spectrum) > 0
        return spectrum * phase.conj() * observed

    def U(self, z: Tensor) -> Tensor:
        return torch.fft.ifft2(z * self._phase(z), norm="ortho").real

    def singular_values(self, image_shape: ImageShape) -> Tensor:
        """|K| on the full H × W frequency grid, shape (H, W)."""
        _, height, width = image_shape
        return self._spectrum(height, width)[0]
