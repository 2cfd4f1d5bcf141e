r"""Measurement operators and their plugin registry (DESIGN.md §2 "Operators").

A measurement is y = A(x) + η, η ~ N(0, σ_y² I), with x a batch of images (B, C, H, W) in the
model's pixel scale [-1, 1] and A linear. Every operator is an :class:`Operator` subclass that
provides A, its exact adjoint Aᵀ (⟨A x, y⟩ = ⟨x, Aᵀ y⟩), an image-shaped back-projection A† and
the measurement shape; the base class derives everything else from them (noisy measurements,
the likelihood gradient g = Aᵀ(A x̂0 − y) / σ_y², the dense matrix of A). An operator may also
give its singular value decomposition (:meth:`Operator.svd`, a :class:`SingularValueDecomposition`),
which the spectral baselines DDRM and DiffPIR need; a plugin without one simply cannot use them.

Operators are discovered through the entry-point group ``deft.operators``; the built-ins
(``superres``, ``blur``, ``inpaint`` in the top-level package ``operators``) are registered in
pyproject.toml exactly like a third-party plugin::

    [project.entry-points."deft.operators"]
    scale = "my_package.scale:Scale"     # a subclass of deftcli.operators.Operator

:func:`available` lists them (a plugin that fails to load is reported, not fatal) and
:func:`create` builds one from keyword parameters validated by the operator's ``Params`` model.
"""

from __future__ import annotations

import abc
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import Field, ValidationError
from torch import Tensor

from deftcli.errors import DeftError
from deftcli.images import open_unit_array
from deftcli.specs import StrictModel

ENTRY_POINT_GROUP = "deft.operators"

ImageShape = tuple[int, int, int]
"""(C, H, W) of one image or one measurement."""


class OperatorParams(StrictModel):
    """Parameters shared by every operator; each operator's ``Params`` model extends this one.

    Unknown parameter names, inf/NaN and booleans in number fields are rejected (:class:`~deftcli.specs.StrictModel`).
    """

    sigma: float = Field(0.05, ge=0, description="std of the Gaussian measurement noise, in the [-1, 1] pixel scale")


class SingularValueDecomposition(abc.ABC):
    r"""A = U S Vᵀ of a linear operator, as functions on batches.

    V is an orthonormal (or unitary) basis of image space: :meth:`Vt` maps images (B, C, H, W) to
    their coordinates in it, the *spectral layout* (B, …), and :meth:`V` maps such coordinates back,
    so V(Vt(x)) = x and ⟨Vt a, Vt b⟩ = ⟨a, b⟩. :meth:`singular_values` gives S ≥ 0, broadcastable
    against the spectral layout; where s = 0 the coordinate lies in the null space of A.
    :meth:`Ut` maps a measurement into the spectral layout (zeros where s = 0) and :meth:`U` maps
    the spectral layout onto measurement space, so that

        A x = U(S · Vt(x)),     Aᵀ y = V(S · Ut(y)).

    The layout may be complex (a unitary Fourier basis): then Vt of a real image is Hermitian
    symmetric, every elementwise operation with real factors keeps that symmetry, and V returns the
    real image. Noise in spectral coordinates is drawn as Vt of real white image noise, which has
    unit variance in every real degree of freedom.
    """

    @abc.abstractmethod
    def Vt(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) → spectral coordinates Vᵀ x."""

    @abc.abstractmethod
    def V(self, z: Tensor) -> Tensor:
        """Spectral coordinates → image V z (real)."""

    @abc.abstractmethod
    def Ut(self, y: Tensor) -> Tensor:
        """Measurement → spectral layout Uᵀ y, zero where s = 0."""

    @abc.abstractmethod
    def U(self, z: Tensor) -> Tensor:
        """Spectral layout → measurement U z (the coordinates where s = 0 are ignored)."""

    @abc.abstractmethod
    def singular_values(self, image_shape: ImageShape) -> Tensor:
        """S ≥ 0 for images of shape (C, H, W) as a float64 CPU tensor, broadcastable against the spectral layout."""

    def singular_values_like(self, x: Tensor) -> Tensor:
        """S for the images x (B, C, H, W), on x's device in x's real dtype."""
        real_dtype = x.real.dtype if x.is_complex() else x.dtype
        return self.singular_values(tuple(x.shape[1:])).to(device=x.device, dtype=real_dtype)  # type: ignore[arg-type]


class Operator(torch.nn.Module, abc.ABC):
    r"""A linear measurement operator y = A(x) + η, η ~ N(0, σ_y² I).

    Subclasses set ``name`` (the registry name) and ``Params`` (their parameter model) and
    implement :meth:`A`, :meth:`A_adjoint`, :meth:`A_dagger` and :meth:`measurement_shape`.
    They accept images on any device and of any floating dtype, batched as (B, C, H, W), and move
    their own buffers (kernels, masks) to the input's device and dtype when they use them.
    Calling the module applies A.
    """

    name: ClassVar[str]
    Params: ClassVar[type[OperatorParams]] = OperatorParams

    def __init__(self, params: OperatorParams) -> None:
        super().__init__()
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} expects {self.Params.__name__}, got {type(params).__name__}")
        self.params = params
        self.sigma: float = params.sigma
        self._constants: dict[tuple[Any, ...], Tensor] = {}

    @abc.abstractmethod
    def A(self, x: Tensor) -> Tensor:
        """Apply the forward operator: x (B, C, H, W) → A x (B, *measurement_shape((C, H, W)))."""

    @abc.abstractmethod
    def A_adjoint(self, y: Tensor) -> Tensor:
        """Apply the exact adjoint Aᵀ: measurement-shaped y → image-shaped Aᵀ y."""

    @abc.abstractmethod
    def A_dagger(self, y: Tensor) -> Tensor:
        """Map a measurement back to image space: A† y (the pseudo-inverse or a documented
        back-projection)."""

    @abc.abstractmethod
    def measurement_shape(self, image_shape: ImageShape) -> ImageShape:
        """Shape (c, h, w) of A x for one image of shape (C, H, W).

        Raises :class:`DeftError` when the operator does not support that image shape.
        """

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    def svd(self) -> SingularValueDecomposition | None:
        """The singular value decomposition A = U S Vᵀ, or None when the operator does not provide one
        (the default: a plugin need not; the spectral baselines DDRM and DiffPIR then refuse it)."""
        return None

    def parameter_files(self) -> dict[str, Path]:
        """The parameters whose values are files this operator reads (a run keeps copies of them).

        The default takes every string parameter that names an existing file. An operator whose
        parameter also accepts names (blur's ``gaussian``, inpaint's ``box``) overrides it, so that a
        file that happens to bear such a name is not taken for the parameter's file.
        """
        return {
            key: Path(value).expanduser()
            for key, value in self.params.model_dump().items()
            if isinstance(value, str) and Path(value).expanduser().is_file()
        }

    def check_images(self, x: Tensor) -> ImageShape:
        """Return the (C, H, W) of a batch x after checking that the operator supports it."""
        if x.ndim != 4:
            raise DeftError(f"{self.name} expects a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        image_shape: ImageShape = tuple(x.shape[1:])  # type: ignore[assignment]
        self.measurement_shape(image_shape)
        return image_shape

    def constant_like(self, key: tuple[Any, ...], like: Tensor, build: Callable[[], Tensor]) -> Tensor:
        """A constant of the operator (a mask, a transfer function) in ``like``'s dtype and on its
        device; ``build()`` makes it once per key, device and dtype."""
        cache_key = (*key, like.device, like.dtype)
        if cache_key not in self._constants:
            self._constants[cache_key] = build().to(like.dtype).to(like.device)
        return self._constants[cache_key]

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a noisy measurement y = A x + σ_y ξ, ξ ~ N(0, I).

        ξ is drawn on the generator's device (x's device without a generator) and then moved to
        x's device, so a seeded CPU generator gives the same y on every device.
        """
        clean = self.A(x)
        if self.sigma == 0:
            return clean
        noise_device = generator.device if generator is not None else clean.device
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=noise_device)
        return clean + self.sigma * noise.to(clean.device)

    def likelihood_grad(self, x0: Tensor, y: Tensor) -> Tensor:
        r"""g = Aᵀ(A x0 − y) / σ_y² = −∇_{x0} log p(y | x0).

        With σ_y = 0 the likelihood is degenerate and the unscaled Aᵀ(A x0 − y) is returned.
        """
        gradient = self.A_adjoint(self.A(x0) - y)
        return gradient if self.sigma == 0 else gradient / self.sigma**2

    def gram_norm(self, image_shape: ImageShape, iterations: int = 50) -> float:
        """λ_A = ‖A Aᵀ‖, the largest eigenvalue of A Aᵀ (= that of Aᵀ A), by power iteration on Aᵀ A
        from a fixed random image, in float64."""
        self.measurement_shape(image_shape)
        x = torch.randn((1, *image_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        eigenvalue = 0.0
        for _ in range(iterations):
            x = self.A_adjoint(self.A(x / x.norm()))
            eigenvalue = float(x.norm())
        return eigenvalue

    def matrix(self, image_shape: ImageShape) -> Tensor:
        """Dense float64 matrix M (m, d) of A for one image of shape (C, H, W), with
        d = C·H·W and m the measurement size: vec(A x) = M vec(x).

        Column j is A applied to the j-th standard basis image, so this is for small images only
        (it holds d² numbers).
        """
        self.measurement_shape(image_shape)
        size = int(np.prod(image_shape))
        basis = torch.eye(size, dtype=torch.float64).reshape(size, *image_shape)
        return self.A(basis).reshape(size, -1).T.contiguous()

    def describe(self) -> str:
        """Short text such as ``superres(factor=4, sigma=0.05)``: parameters, σ_y last."""
        values = self.params.model_dump()
        values["sigma"] = values.pop("sigma")
        return f"{self.name}({', '.join(f'{key}={value}' for key, value in values.items())})"


def read_grayscale_image(path: str | Path, what: str, alternatives: Sequence[str] = ()) -> Tensor:
    """Read an image file as a float64 (H, W) tensor of gray levels in [0, 1].

    ``what`` names the file in error messages (e.g. "inpaint mask"); ``alternatives`` are the
    named choices the same parameter also accepts, listed when the file does not exist.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        options = [*(f"'{alternative}'" for alternative in alternatives), "an existing file"]
        listed = " or ".join([", ".join(options[:-1]), options[-1]] if alternatives else options)
        raise DeftError(f"{what} '{path}' is not {listed}")
    try:
        unit = open_unit_array(file).astype(np.float64)  # 16-bit files keep their 16 bits
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DeftError(f"{what} '{path}' is not a readable image: {error}") from error
    gray = unit[..., 0] if unit.shape[-1] == 1 else unit @ np.array([0.299, 0.587, 0.114])  # luma, as Pillow's "L"
    return torch.from_numpy(np.ascontiguousarray(gray))


@dataclass(frozen=True)
class OperatorInfo:
    """One entry of the registry.

    ``operator_class`` is None when the plugin is broken; ``error`` then says why.
    ``target`` is the entry point's ``module:attribute``; ``distribution`` the installed
    distribution that registers it (None when unknown).
    """

    name: str
    target: str
    distribution: str | None
    operator_class: type[Operator] | None
    error: str | None = None

    @property
    def params_model(self) -> type[OperatorParams] | None:
        """The operator's pydantic parameter model (None for a broken plugin)."""
        return None if self.operator_class is None else self.operator_class.Params

    @property
    def source(self) -> str:
        """Where the operator comes from, for messages: ``target`` and its distribution."""
        return f"{self.target} from distribution {self.distribution or 'unknown'}"


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    """The installed entry points of the ``deft.operators`` group (tests replace this)."""
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _distribution_name(entry_point: importlib.metadata.EntryPoint) -> str | None:
    distribution = getattr(entry_point, "dist", None)
    return None if distribution is None else distribution.name


def _discover() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Entry points by operator name, without importing them (a name may be registered twice)."""
    registered: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for entry_point in _entry_points():
        candidates = registered.setdefault(entry_point.name, [])
        if all(entry_point.value != other.value for other in candidates):
            candidates.append(entry_point)
    return dict(sorted(registered.items()))


def _operator_class_problem(name: str, loaded: object) -> str | None:
    """Why a loaded entry point is not a usable operator class, or None if it is one."""
    if not (inspect.isclass(loaded) and issubclass(loaded, Operator)):
        return f"{loaded!r} is not a subclass of deftcli.operators.Operator"
    if not (inspect.isclass(loaded.Params) and issubclass(loaded.Params, OperatorParams)):
        return f"{loaded.__name__}.Params is not a subclass of deftcli.operators.OperatorParams"
    if getattr(loaded, "name", None) != name:
        return f"{loaded.__name__}.name is {getattr(loaded, 'name', None)!r}, not {name!r}"
    if inspect.isabstract(loaded):
        missing = ", ".join(sorted(loaded.__abstractmethods__))
        return f"{loaded.__name__} does not implement {missing}"
    return None


def _load(name: str, candidates: list[importlib.metadata.EntryPoint]) -> OperatorInfo:
    """Import one registered operator; any failure is recorded in the returned info."""
    entry_point = candidates[0]
    info = OperatorInfo(name, entry_point.value, _distribution_name(entry_point), None)
    if len(candidates) > 1:
        sources = "; ".join(f"{other.value} from {_distribution_name(other) or 'unknown'}" for other in candidates)
        return replace(info, error=f"registered more than once ({sources})")
    try:
        loaded = entry_point.load()
    except Exception as error:  # a third-party plugin can fail in any way; report, don't crash
        return replace(info, error=f"{type(error).__name__}: {error}")
    problem = _operator_class_problem(name, loaded)
    if problem is not None:
        return replace(info, error=problem)
    return replace(info, operator_class=loaded)


def available() -> dict[str, OperatorInfo]:
    """All registered operators by name (sorted), broken plugins included with their error."""
    return {name: _load(name, candidates) for name, candidates in _discover().items()}


def _operator_class(name: str) -> type[Operator]:
    """Load one operator class by name, raising DeftError if it is unknown or broken."""
    registered = _discover()
    if name not in registered:
        installed = ", ".join(registered) or "none (is the deft package installed?)"
        raise DeftError(f"unknown operator '{name}'; installed operators: {installed}")
    info = _load(name, registered[name])
    if info.operator_class is None:
        raise DeftError(f"operator plugin '{name}' ({info.source}) cannot be loaded: {info.error}")
    return info.operator_class


def _validation_message(name: str, model: type[OperatorParams], error: ValidationError) -> str:
    problems = []
    for detail in error.errors():
        field = ".".join(str(part) for part in detail["loc"])
        if detail["type"] == "extra_forbidden":
            problems.append(f"unknown parameter '{field}' (its parameters: {', '.join(model.model_fields)})")
        elif field:
            problems.append(f"parameter '{field}'={detail['input']!r}: {detail['msg']}")
        else:
            problems.append(detail["msg"])
    return f"invalid parameters for operator '{name}': {'; '.join(problems)}"


def create(name: str, **params: Any) -> Operator:
    """Build the operator registered as ``name`` with validated keyword parameters.

    Values may be strings (as typed on a command line); pydantic converts them. Raises
    :class:`DeftError` for an unknown name (listing the installed ones), a broken plugin (naming
    it and its error), a bad parameter (naming operator, parameter and problem) or a parameter
    file (kernel, mask) that cannot be read.
    """
    operator_class = _operator_class(name)
    try:
        validated = operator_class.Params(**params)
    except ValidationError as error:
        raise DeftError(_validation_message(name, operator_class.Params, error)) from error
    return operator_class(validated)


def operator_param_names(name: str) -> list[str]:
    """Parameter names of operator ``name`` (``sigma`` included), in model order.

    Raises :class:`DeftError` for an unknown or broken operator. Defaults, types and descriptions
    are in ``available()[name].params_model.model_fields``.
    """
    operator_class = _operator_class(name)
    return list(operator_class.Params.model_fields)
