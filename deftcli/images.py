"""Reading and writing images and measurement tensors: the one place where pixels meet [-1, 1].

An image file of mode L, LA, I;16 or I is read as one channel; RGB, RGBA, P, CMYK as three. Alpha is
composited onto black (0 in [0, 1], −1 in the model scale), 16-bit images keep their precision.
Values v ∈ [0, 1] map to 2v − 1. Measurements may also be tensor files (``.safetensors`` with a
tensor named ``image``), which keep noise and values outside [-1, 1] exactly.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import DeftError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
TENSOR_SUFFIX = ".safetensors"


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] → [0, 1] (clamped)."""
    return ((x + 1) / 2).clamp(0, 1)


def from_unit(x: Tensor) -> Tensor:
    """[0, 1] → [-1, 1]."""
    return 2 * x - 1


def pil_to_unit_array(img: Image.Image) -> np.ndarray:
    """(H, W, C) float32 array in [0, 1] for any Pillow mode; integer modes I;16 and I (how Pillow opens
    16-bit PNG and TIFF files) are 16-bit, 0…65535, whatever values one image happens to hold."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return (np.asarray(img, dtype=np.float32) / 65535.0)[..., None].clip(0, 1)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)[..., None].clip(0, 1)
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255.0
    if img.mode == "LA":
        la = np.asarray(img, dtype=np.float32) / 255.0
        return la[..., :1] * la[..., 1:2]
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    return rgba[..., :3] * rgba[..., 3:4]


def open_unit_array(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file with :func:`pil_to_unit_array`; Pillow's decompression-bomb warning (past
    its pixel limit) is raised as an error, like the bomb error past twice that limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            return pil_to_unit_array(img)


def read_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as a (C, H, W) float32 tensor in [-1, 1] (C = 1 or 3)."""
    path = Path(path)
    if not path.exists():
        raise DeftError(f"{path}: no such file")
    if path.is_dir():
        raise DeftError(f"{path}: is a folder, expected an image file")
    if not path.is_file():
        raise DeftError(
            f"{path}: not a regular file (a pipe or a device would block or never end), expected an image file"
        )
    try:
        arr = open_unit_array(path)
    except UnidentifiedImageError:
        raise DeftError(f"{path}: not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DeftError(
            f"{path}: image too large to read safely (over Pillow's {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DeftError(f"{path}: cannot read image ({exc})") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DeftError(f"{path}: empty image")
    return from_unit(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))


def read_tensor(path: str | os.PathLike) -> Tensor:
    """Read a (C, H, W) or (1, C, H, W) tensor named ``image`` from a safetensors file."""
    path = Path(path)
    if not path.exists():
        raise DeftError(f"{path}: no such file")
    if not path.is_file():
        raise DeftError(f"{path}: not a regular file, expected a .safetensors file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeftError(f"{path}: not a readable safetensors file ({exc})") from None
    if "image" not in tensors:
        raise DeftError(f"{path}: expected a tensor named 'image', found {sorted(tensors)}")
    if not tensors["image"].is_floating_point():
        raise DeftError(
            f"{path}: the image tensor is {str(tensors['image'].dtype).removeprefix('torch.')}; "
            "expected floating point in the model's [-1, 1] scale"
        )
    x = tensors["image"].float()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise DeftError(f"{path}: expected an image tensor of shape (C, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DeftError(
            f"{path}: the image tensor holds {int((~torch.isfinite(x)).sum())} non-finite values (NaN or inf)"
        )
    return x


def read_measurement(path: str | os.PathLike) -> Tensor:
    """A measurement from an image file or a ``.safetensors`` tensor file, (C, h, w) in the model scale."""
    return read_tensor(path) if str(path).endswith(TENSOR_SUFFIX) else read_image(path)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image and tensor files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (TENSOR_SUFFIX,))


def _file_in_the_way(folder: Path) -> Path | None:
    """The first of ``folder`` and its parents that exists but is not a folder (so ``folder`` cannot be made)."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def output_folder(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents); a location that cannot hold one is a DeftError."""
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        what = "exists and is not a folder" if blocker == path else f"cannot be created, {blocker} is a file"
        raise DeftError(f"{path}: {what} (choose another output folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeftError(f"{path}: cannot create output folder ({exc.strerror or exc})") from None
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``, so readers never see half a file.

    This is where every output file is written: a location that cannot be written (a parent that is
    a file, a folder in the way, no permission, a full disk) is a :class:`DeftError` naming ``path``,
    and a file that was there before keeps its previous content.
    """
    path = Path(path)
    if path.is_dir():
        raise DeftError(f"{path}: cannot write a file there, it is a folder")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise DeftError(f"{path}: cannot write, {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeftError(f"{path}: cannot write ({exc.strerror or exc})") from None
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what a plain open() would give; some writers create their files 0600
        os.replace(tmp, path)
    except OSError as exc:
        kept = "; the previous version of the file is unchanged" if existed else ""
        raise DeftError(f"{path}: cannot write ({exc.strerror or exc}){kept}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def save_image(x: Tensor, path: str | os.PathLike) -> Path:
    """Write a (C, H, W) tensor in [-1, 1] as an 8-bit image (or exactly, to a ``.safetensors`` path)."""
    path = Path(path)
    x = x.detach().float().cpu()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if path.suffix == TENSOR_SUFFIX:
        atomic_write(path, lambda tmp: save_file({"image": x.contiguous()}, str(tmp)))
        return path
    arr = (to_unit(x.nan_to_num(0.0)).numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DeftError(f"{path}: unknown image format '{path.suffix}' (use .png or .safetensors)")
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt))
    return path


def colormap(values: Tensor) -> Tensor:
    """Map a (H, W) non-negative map to a (3, H, W) image in [-1, 1] with a perceptual ramp (magma-like).

    The map is scaled by its maximum, so it shows where uncertainty is, not its absolute size
    (the maximum is reported next to it).
    """
    v = values / values.max().clamp_min(1e-12)
    stops = torch.tensor(
        [
            [0.0, 0.0, 0.02],
            [0.23, 0.06, 0.44],
            [0.55, 0.16, 0.51],
            [0.87, 0.29, 0.40],
            [0.99, 0.64, 0.36],
            [0.99, 0.99, 0.75],
        ]
    )
    pos = v.clamp(0, 1) * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    return from_unit(rgb.permute(2, 0, 1))


def image_grid(rows: list[Tensor], pad: int = 1) -> Tensor:
    """Stack rows of (N, C, H, W) images (equal C, H, W; grey rows are repeated to RGB) into one image."""
    channels = max(r.shape[1] for r in rows)
    width = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    grid = torch.ones(channels, len(rows) * (h + pad) + pad, width * (w + pad) + pad)
    for i, row in enumerate(rows):
        row = row.detach().float().cpu()
        if row.shape[1] != channels:
            row = row.expand(-1, channels, -1, -1)
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top : top + h, left : left + w] = img
    return grid


def upsample_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a (B, C, h, w) batch to (H, W), to show measurements next to images."""
    return torch.nn.functional.interpolate(x, size=size, mode="nearest")
