"""Tests of the measurement operators and their plugin registry (deftcli.operators, operators/)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import Field
from torch import Tensor

from deftcli import operators as registry
from deftcli.errors import DeftError
from deftcli.operators import ImageShape, Operator, OperatorParams, available, create

BUILTINS = ("blur", "inpaint", "superres")
KERNEL_FILE = "<kernel image>"
MASK_FILE = "<32x32 mask image>"


@dataclass(frozen=True)
class Case:
    """An operator with parameters, applied to a batch of `batch` images of `image_shape`."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    image_shape: ImageShape = (3, 32, 32)
    batch: int = 2

    def __str__(self) -> str:
        settings = ",".join(f"{key}={value}" for key, value in self.params.items())
        channels, height, width = self.image_shape
        return f"{self.name}({settings})-{self.batch}x{channels}x{height}x{width}"


DEFAULT_CASES = [Case(name) for name in available()]
VARIANT_CASES = [
    Case("superres", {"factor": 2}, (1, 64, 64), batch=3),
    Case("superres", {"factor": 4}, (3, 64, 64)),
    Case("blur", {"kernel": "gaussian", "kernel_size": 5, "kernel_std": 1.0}, (1, 64, 64), batch=3),
    Case("blur", {"kernel": "uniform", "kernel_size": 3}, (3, 32, 32)),
    Case("blur", {"kernel": KERNEL_FILE}, (3, 32, 32)),
    Case("blur", {"kernel": "gaussian"}, (1, 256, 256), batch=1),
    Case("inpaint", {"mask": "box", "box_fraction": 0.3}, (3, 64, 64)),
    Case("inpaint", {"mask": "random", "missing_fraction": 0.5, "mask_seed": 3}, (3, 64, 64)),
    Case("inpaint", {"mask": MASK_FILE}, (1, 32, 32), batch=3),
]
CASES = DEFAULT_CASES + VARIANT_CASES


@pytest.fixture(scope="session")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 5x7 asymmetric kernel image and a 32x32 mask image (white = observed)."""
    folder = tmp_path_factory.mktemp("operator_files")
    rng = np.random.default_rng(0)
    kernel_path = folder / "kernel.png"
    Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8), mode="L").save(kernel_path)
    mask_path = folder / "mask.png"
    mask = np.where(rng.random((32, 32)) < 0.6, 255, 0).astype(np.uint8)
    Image.fromarray(mask, mode="L").save(mask_path)
    return {KERNEL_FILE: kernel_path, MASK_FILE: mask_path}


def build(case: Case, files: dict[str, Path], **overrides: Any) -> Operator:
    """Create the case's operator, with file placeholders replaced by the files' paths."""
    params = {key: str(files.get(value, value)) for key, value in case.params.items() if isinstance(value, str)}
    return create(case.name, **{**case.params, **params, **overrides})


def random_images(case: Case, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(case.batch, *case.image_shape, generator=generator, dtype=dtype)


def dense(linear_map: Callable[[Tensor], Tensor], input_shape: ImageShape) -> Tensor:
    """The (out, in) float64 matrix of a linear map on single images of `input_shape`."""
    size = int(np.prod(input_shape))
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    return linear_map(basis).reshape(size, -1).T


# --- generic properties, for every registered operator and the built-ins' variants ---------------


def test_builtins_are_registered_through_entry_points() -> None:
    infos = available()
    for name in BUILTINS:
        assert infos[name].error is None, infos[name].error
        assert infos[name].distribution == "deft"
        assert issubclass(infos[name].operator_class, Operator)
        assert infos[name].operator_class.name == name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adjoint_is_exact(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files)
    x = random_images(case, seed=1)
    y = torch.randn_like(operator.A(x))
    forward_product = torch.sum(operator.A(x) * y)
    adjoint_product = torch.sum(x * operator.A_adjoint(y))
    assert abs(forward_product - adjoint_product) / abs(forward_product) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=str)
def test_shapes(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files)
    x = random_images(case)
    y = operator.A(x)
    assert y.shape == (case.batch, *operator.measurement_shape(case.image_shape))
    assert operator(x).shape == y.shape
    assert operator.measure(x).shape == y.shape
    assert operator.A_adjoint(y).shape == x.shape
    assert operator.A_dagger(y).shape == x.shape


@pytest.mark.parametrize("case", CASES, ids=str)
def test_likelihood_grad_is_scaled_adjoint_residual(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files, sigma=0.1)
    x0, other = random_images(case, seed=2), random_images(case, seed=3)
    y = operator.measure(other, torch.Generator().manual_seed(0))
    expected = operator.A_adjoint(operator.A(x0) - y) / 0.1**2
    torch.testing.assert_close(operator.likelihood_grad(x0, y), expected)
    noiseless = build(case, image_files, sigma=0)
    torch.testing.assert_close(noiseless.likelihood_grad(x0, y), expected * 0.1**2)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_measure_is_deterministic_with_a_seeded_generator(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files)
    x = random_images(case)
    first = operator.measure(x, torch.Generator().manual_seed(7))
    again = operator.measure(x, torch.Generator().manual_seed(7))
    other = operator.measure(x, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(build(case, image_files, sigma=0).measure(x), operator.A(x))


@pytest.mark.parametrize("name", list(available()))
@pytest.mark.parametrize("sigma", [0.05, 0.2])
def test_measurement_noise_has_std_sigma(name: str, sigma: float) -> None:
    operator = create(name, sigma=sigma)
    x = random_images(Case(name, image_shape=(3, 64, 64), batch=8), dtype=torch.float32)
    noise = operator.measure(x, torch.Generator().manual_seed(0)) - operator.A(x)
    assert abs(noise.std().item() / sigma - 1) < 0.05
    assert abs(noise.mean().item()) < 0.05 * sigma


MATRIX_CASES = [Case(name, image_shape=(2, 8, 8), batch=3) for name in available()] + [
    Case("superres", {"factor": 2}, (1, 8, 8), batch=3),
    Case("blur", {"kernel": "uniform", "kernel_size": 9}, (1, 8, 8), batch=3),  # wraps around
    Case("inpaint", {"mask": "random"}, (3, 8, 8), batch=3),
]


@pytest.mark.parametrize("case", MATRIX_CASES, ids=str)
def test_matrix_agrees_with_A(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files)
    matrix = operator.matrix(case.image_shape)
    measurement_size = int(np.prod(operator.measurement_shape(case.image_shape)))
    assert matrix.dtype == torch.float64
    assert matrix.shape == (measurement_size, int(np.prod(case.image_shape)))
    x = random_images(case)
    expected = operator.A(x).reshape(case.batch, -1)
    torch.testing.assert_close(x.reshape(case.batch, -1) @ matrix.T, expected)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operators_keep_the_input_dtype(case: Case, dtype: torch.dtype) -> None:
    operator = create(case.name)
    x = random_images(case)
    y = operator.A(x)
    for method, argument, reference in [
        (operator.A, x, y),
        (operator.A_adjoint, y, operator.A_adjoint(y)),
        (operator.A_dagger, y, operator.A_dagger(y)),
    ]:
        result = method(argument.to(dtype))
        assert result.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(result.double(), reference, atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_cpu(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files)
    x = random_images(case, dtype=torch.float32)
    on_gpu = operator.measure(x.cuda(), torch.Generator().manual_seed(5))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), operator.measure(x, torch.Generator().manual_seed(5)))
    y = operator.A(x)
    torch.testing.assert_close(operator.A_adjoint(y.cuda()).cpu(), operator.A_adjoint(y))
    torch.testing.assert_close(operator.A_dagger(y.cuda()).cpu(), operator.A_dagger(y))


def test_describe() -> None:
    assert create("superres", factor=4).describe() == "superres(factor=4, sigma=0.05)"
    assert create("blur", sigma=0.1).describe() == ("blur(kernel=gaussian, kernel_size=9, kernel_std=2.0, sigma=0.1)")


def test_parameters_given_as_strings_are_converted() -> None:
    operator = create("superres", factor="2", sigma="0.1")
    assert operator.params.factor == 2 and operator.sigma == 0.1


def test_operator_param_names() -> None:
    assert registry.operator_param_names("superres") == ["sigma", "factor"]
    assert registry.operator_param_names("blur") == ["sigma", "kernel", "kernel_size", "kernel_std"]
    assert registry.operator_param_names("inpaint") == [
        "sigma",
        "mask",
        "box_fraction",
        "missing_fraction",
        "mask_seed",
    ]
    for info in available().values():
        for field_info in info.params_model.model_fields.values():
            assert field_info.description


# --- built-in specifics ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.name == "superres"], ids=str)
def test_superres_dagger_is_a_right_inverse_and_block_constant(case: Case) -> None:
    operator = create("superres", **case.params)
    factor = operator.params.factor
    y = operator.A(random_images(case))
    upsampled = operator.A_dagger(y)
    torch.testing.assert_close(operator.A(upsampled), y)
    block = upsampled[..., :factor, :factor]
    torch.testing.assert_close(block, block[..., :1, :1].expand_as(block))


@pytest.mark.parametrize(
    "name, params",
    [
        ("superres", {"factor": 2}),
        ("superres", {"factor": 4}),
        ("inpaint", {"mask": "box"}),
        ("inpaint", {"mask": "random"}),
    ],
)
def test_dagger_is_the_moore_penrose_pseudo_inverse(name: str, params: dict[str, Any]) -> None:
    operator = create(name, **params)
    image_shape = (1, 8, 8)
    measurement_shape = operator.measurement_shape(image_shape)
    dagger = dense(operator.A_dagger, measurement_shape)
    torch.testing.assert_close(dagger, torch.linalg.pinv(operator.matrix(image_shape)))


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.5])
def test_blur_dagger_is_the_tikhonov_inverse(sigma: float) -> None:
    operator = create("blur", kernel_size=5, kernel_std=1.5, sigma=sigma)
    assert operator.tikhonov_eps == max(sigma**2, 1e-3)
    matrix = operator.matrix((1, 8, 8))
    regularised = matrix.T @ matrix + operator.tikhonov_eps * torch.eye(64, dtype=torch.float64)
    expected = torch.linalg.solve(regularised, matrix.T)
    torch.testing.assert_close(dense(operator.A_dagger, (1, 8, 8)), expected)


def test_blur_is_a_centred_convolution(tmp_path: Path) -> None:
    """A 3x3 kernel image with its only white pixel above the centre, k[0, 1] = 1, gives
    (A x)[i, j] = x[(i + 1) mod H, j]: the image moves up by one row."""
    kernel = np.zeros((3, 3), dtype=np.uint8)
    kernel[0, 1] = 255
    path = tmp_path / "shift.png"
    Image.fromarray(kernel, mode="L").save(path)
    x = random_images(Case("blur", image_shape=(2, 16, 16)))
    torch.testing.assert_close(create("blur", kernel=str(path)).A(x), torch.roll(x, shifts=-1, dims=-2))


@pytest.mark.parametrize(
    "params", [{"kernel": "gaussian"}, {"kernel": "uniform", "kernel_size": 5}, {"kernel": KERNEL_FILE}]
)
def test_blur_kernels_are_normalised(params: dict[str, Any], image_files: dict[str, Path]) -> None:
    operator = build(Case("blur", params), image_files)
    assert abs(operator.kernel.sum().item() - 1) < 1e-12
    constant = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    torch.testing.assert_close(operator.A(constant), constant)


def test_gaussian_kernel_shape() -> None:
    kernel = create("blur", kernel_size=7, kernel_std=1.0).kernel
    assert kernel.shape == (7, 7)
    torch.testing.assert_close(kernel, kernel.flip(0))
    torch.testing.assert_close(kernel, kernel.T)
    assert kernel.argmax().item() == 3 * 7 + 3
    torch.testing.assert_close(kernel[3, 4] / kernel[3, 3], torch.tensor(np.exp(-0.5), dtype=torch.float64))


def test_inpaint_box_mask_is_centred() -> None:
    mask = create("inpaint", mask="box", box_fraction=0.5).observed_mask(32, 32)
    assert not mask[8:24, 8:24].any()
    assert mask.sum().item() == 32 * 32 - 16 * 16


def test_inpaint_random_mask_follows_its_seed() -> None:
    def mask(seed: int) -> Tensor:
        return create("inpaint", mask="random", missing_fraction=0.7, mask_seed=seed).observed_mask(64, 64)

    assert torch.equal(mask(0), mask(0))
    assert not torch.equal(mask(0), mask(1))
    assert abs((~mask(0)).double().mean().item() - 0.7) < 0.03


def test_inpaint_file_mask_keeps_white_pixels(image_files: dict[str, Path]) -> None:
    operator = create("inpaint", mask=str(image_files[MASK_FILE]))
    white = torch.from_numpy(np.asarray(Image.open(image_files[MASK_FILE])) == 255)
    assert torch.equal(operator.observed_mask(32, 32), white)


@pytest.mark.parametrize("case", [c for c in CASES if c.name == "inpaint"], ids=str)
def test_inpaint_dagger_recovers_the_observed_pixels(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files, sigma=0)
    x = random_images(case)
    observed = operator.observed_mask(*case.image_shape[1:])
    recovered = operator.A_dagger(operator.measure(x))
    torch.testing.assert_close(recovered[..., observed], x[..., observed])
    assert not recovered[..., ~observed].any()
    torch.testing.assert_close(operator.A(recovered), operator.A(x))


# --- user errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("nope", {}, ["unknown operator 'nope'", "blur, inpaint, superres"]),
        ("superres", {"factor": 0}, ["superres", "'factor'", "greater than or equal to 2"]),
        ("superres", {"factor": 1}, ["superres", "'factor'", "greater than or equal to 2"]),
        ("superres", {"factor": "two"}, ["superres", "'factor'", "integer"]),
        ("superres", {"sigma": -0.1}, ["superres", "'sigma'", "greater than or equal to 0"]),
        ("superres", {"size": 3}, ["unknown parameter 'size'", "sigma, factor"]),
        ("blur", {"kernel_size": 4}, ["blur", "'kernel_size'", "odd"]),
        ("blur", {"kernel_std": 0}, ["blur", "'kernel_std'", "greater than 0"]),
        ("blur", {"kernel": "gausian"}, ["blur kernel 'gausian' is not 'gaussian', 'uniform' or an existing file"]),
        ("inpaint", {"mask": "missing.png"}, ["inpaint mask 'missing.png' is not 'box', 'random' or an existing file"]),
        ("inpaint", {"missing_fraction": 1.5}, ["inpaint", "'missing_fraction'"]),
    ],
)
def test_bad_parameters_raise_one_line_errors(name: str, params: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(DeftError) as error:
        create(name, **params)
    message = str(error.value)
    assert "\n" not in message
    for text in expected:
        assert text in message


def test_unsupported_image_sizes_raise(image_files: dict[str, Path]) -> None:
    superres = create("superres", factor=3)
    with pytest.raises(DeftError, match="factor 3 does not divide the image size 32x32"):
        superres.measurement_shape((3, 32, 32))
    with pytest.raises(DeftError, match="factor 3"):
        superres.A(torch.zeros(1, 3, 32, 32))
    inpaint = create("inpaint", mask=str(image_files[MASK_FILE]))
    with pytest.raises(DeftError, match="is 32x32 but the image is 64x64"):
        inpaint.measurement_shape((3, 64, 64))
    with pytest.raises(DeftError, match="is 32x32 but the image is 64x48"):
        inpaint.A(torch.zeros(1, 3, 64, 48))
    with pytest.raises(DeftError, match=r"batch of images \(B, C, H, W\)"):
        superres.A(torch.zeros(3, 30, 30))


@pytest.mark.parametrize("name, parameter", [("blur", "kernel"), ("inpaint", "mask")])
def test_unreadable_image_files_raise(name: str, parameter: str, tmp_path: Path) -> None:
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(DeftError, match="is not a readable image"):
        create(name, **{parameter: str(text_file)})
    with pytest.raises(DeftError, match="or an existing file"):
        create(name, **{parameter: str(tmp_path)})


def test_16_bit_mask_and_kernel_images_keep_their_16_bits(tmp_path: Path) -> None:
    levels = np.full((16, 16), 65535, dtype=np.uint16)
    levels[4:12, 4:12] = 1000  # dark (missing) in 16 bits; an 8-bit reading would clip 1000 to white
    Image.fromarray(levels).save(tmp_path / "mask16.png")
    assert Image.open(tmp_path / "mask16.png").mode.startswith("I")
    observed = create("inpaint", mask=str(tmp_path / "mask16.png"), sigma=0).A(torch.ones(1, 1, 16, 16))
    assert int((observed == 0).sum()) == 64

    gauss = np.exp(-((np.arange(9) - 4) ** 2) / 8.0)
    kernel = np.outer(gauss, gauss)
    Image.fromarray((kernel / kernel.max() * 65535).round().astype(np.uint16)).save(tmp_path / "k16.png")
    Image.fromarray((kernel / kernel.max() * 255).round().astype(np.uint8)).save(tmp_path / "k8.png")
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    blur16, blur8 = (create("blur", kernel=str(tmp_path / f"{k}.png"), sigma=0).A(x) for k in ("k16", "k8"))
    torch.testing.assert_close(blur16, blur8, atol=5e-3, rtol=0)


def test_black_kernel_image_raises(tmp_path: Path) -> None:
    path = tmp_path / "black.png"
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8), mode="L").save(path)
    with pytest.raises(DeftError, match="entirely black"):
        create("blur", kernel=str(path))


# --- plugins ---------------------------------------------------------------------------------------


class Scale(Operator):
    """A third-party operator: y = a x."""

    name = "scale"

    class Params(OperatorParams):
        a: float = Field(2.0, gt=0, description="gain a")

    def measurement_shape(self, image_shape: ImageShape) -> ImageShape:
        return image_shape

    def A(self, x: Tensor) -> Tensor:
        return self.params.a * x

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.params.a * y

    def A_dagger(self, y: Tensor) -> Tensor:
        return y / self.params.a


@dataclass
class FakeDistribution:
    name: str


@dataclass
class FakeEntryPoint:
    """Stands in for an importlib.metadata.EntryPoint of another installed distribution."""

    name: str
    value: str
    load: Callable[[], object]
    dist: FakeDistribution = field(default_factory=lambda: FakeDistribution("deft-extra-operators"))


def failing_import() -> object:
    raise ImportError("No module named 'deft_broken'")


def with_plugins(monkeypatch: pytest.MonkeyPatch, *plugins: FakeEntryPoint) -> None:
    installed = list(importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP))
    monkeypatch.setattr(registry, "_entry_points", lambda: installed + list(plugins))


def test_third_party_plugin_is_listed_and_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    with_plugins(monkeypatch, FakeEntryPoint("scale", "deft_extra.scale:Scale", lambda: Scale))
    info = available()["scale"]
    assert (info.operator_class, info.distribution, info.error) == (Scale, "deft-extra-operators", None)
    assert info.params_model is Scale.Params
    assert set(BUILTINS) < set(available())
    operator = create("scale", a=3.0, sigma=0.0)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(operator.measure(x), 3 * x)
    torch.testing.assert_close(operator.matrix((1, 2, 2)), 3 * torch.eye(4, dtype=torch.float64))
    assert operator.describe() == "scale(a=3.0, sigma=0.0)"
    with pytest.raises(DeftError, match="'a'=-1"):
        create("scale", a=-1)
    with pytest.raises(DeftError, match="unknown operator 'nope'; installed operators: blur, inpaint, scale"):
        create("nope")


class Offset(Scale):
    """A plugin whose parameter has no default."""

    name = "offset"

    class Params(OperatorParams):
        b: float


def test_a_required_plugin_parameter_is_listed_as_required(monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    with_plugins(monkeypatch, FakeEntryPoint("offset", "deft_extra.offset:Offset", lambda: Offset))
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli("operators")
    assert code == 0 and "b (required)" in out and "Undefined" not in out


class NotAnOperator:
    name = "plain"


class Unfinished(Operator):
    name = "unfinished"

    def measurement_shape(self, image_shape: ImageShape) -> ImageShape:
        return image_shape


@pytest.mark.parametrize(
    "plugin, expected",
    [
        (FakeEntryPoint("broken", "deft_broken:Broken", failing_import), "ImportError: No module named 'deft_broken'"),
        (
            FakeEntryPoint("plain", "deft_extra:NotAnOperator", lambda: NotAnOperator),
            "is not a subclass of deftcli.operators.Operator",
        ),
        (
            FakeEntryPoint("unfinished", "deft_extra:Unfinished", lambda: Unfinished),
            "Unfinished does not implement A, A_adjoint, A_dagger",
        ),
        (FakeEntryPoint("renamed", "deft_extra.scale:Scale", lambda: Scale), "Scale.name is 'scale', not 'renamed'"),
    ],
    ids=["import-error", "not-an-operator", "abstract", "wrong-name"],
)
def test_broken_plugin_is_reported_without_breaking_the_others(
    plugin: FakeEntryPoint, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_plugins(monkeypatch, plugin)
    infos = available()
    assert infos[plugin.name].operator_class is None
    assert expected in infos[plugin.name].error
    assert infos[plugin.name].distribution == "deft-extra-operators"
    with pytest.raises(DeftError) as error:
        create(plugin.name)
    message = str(error.value)
    assert f"operator plugin '{plugin.name}'" in message
    assert plugin.value in message and "deft-extra-operators" in message and expected in message
    with pytest.raises(DeftError, match="cannot be loaded"):
        registry.operator_param_names(plugin.name)
    for name in BUILTINS:
        assert infos[name].error is None
        assert create(name).A(torch.zeros(1, 1, 32, 32)).shape[:2] == (1, 1)


def test_a_name_registered_twice_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    with_plugins(monkeypatch, FakeEntryPoint("superres", "deft_extra.scale:Scale", lambda: Scale))
    assert "registered more than once" in available()["superres"].error
    with pytest.raises(DeftError, match="operators.superres:SuperResolution from deft"):
        create("superres")
    assert available()["blur"].error is None


@pytest.mark.parametrize("case", MATRIX_CASES, ids=str)
def test_gram_norm_is_the_largest_eigenvalue_of_A_At(case: Case, image_files: dict[str, Path]) -> None:
    operator = build(case, image_files)
    matrix = operator.matrix(case.image_shape)
    expected = float(torch.linalg.eigvalsh(matrix @ matrix.T).max())
    assert operator.gram_norm(case.image_shape) == pytest.approx(expected, rel=1e-6)


def test_a_run_keeps_only_the_files_an_operator_reads_not_files_named_like_its_named_choices(tmp_path, monkeypatch):
    from deftcli.runs import keep_operator_files
    from deftcli.specs import FinetuneSpec

    monkeypatch.chdir(tmp_path)
    for name in ("gaussian", "box"):
        (tmp_path / name).write_text("a file that happens to bear a kernel's or a mask's name")
    assert create("blur", kernel="gaussian").parameter_files() == {}
    assert create("inpaint", mask="box").parameter_files() == {}
    run = tmp_path / "run"
    run.mkdir()
    spec = FinetuneSpec(operator={"name": "inpaint", "params": {"mask": "box"}})
    assert keep_operator_files(spec, create("inpaint", mask="box"), run).operator.params["mask"] == "box" and not any(
        run.iterdir()
    )

    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "observed.png")
    assert create("inpaint", mask="observed.png").parameter_files() == {"mask": Path("observed.png")}
    assert create("blur", kernel="observed.png").parameter_files() == {"kernel": Path("observed.png")}
    spec = FinetuneSpec(operator={"name": "blur", "params": {"kernel": "observed.png", "kernel_std": 3.0}})
    kept = keep_operator_files(spec, create("blur", kernel="observed.png", kernel_std=3.0), run).operator.params
    assert kept == {"kernel": "operator-kernel.png", "kernel_std": 3.0}
    assert (run / "operator-kernel.png").read_bytes() == (tmp_path / "observed.png").read_bytes()


@pytest.mark.parametrize("case", MATRIX_CASES, ids=str)
def test_svd_is_orthonormal_and_reproduces_A_and_its_adjoint(case: Case, image_files: dict[str, Path]) -> None:
    """Every built-in gives A = U S Vᵀ: Vᵀ is an isometry (VᵀV = I), V inverts it, A x = U(S Vᵀx), Aᵀ y = V(S Uᵀy)."""
    operator = build(case, image_files)
    svd = operator.svd()
    size = int(np.prod(case.image_shape))
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *case.image_shape)
    coordinates = svd.Vt(basis).reshape(size, -1)  # row j: the spectral coordinates of basis image j
    torch.testing.assert_close((coordinates.conj() @ coordinates.T).real, torch.eye(size, dtype=torch.float64))
    x = random_images(case, seed=3)
    y = operator.A(random_images(case, seed=4)) + 0.1
    s = svd.singular_values_like(x)
    assert (s >= 0).all()
    torch.testing.assert_close(svd.V(svd.Vt(x)), x)
    torch.testing.assert_close(svd.U(s * svd.Vt(x)), operator.A(x))
    torch.testing.assert_close(svd.V(s * svd.Ut(y)), operator.A_adjoint(y))
    assert (svd.Ut(y) * (s == 0)).abs().max() == 0
