"""Image data sets behind one small contract: ``len(ds)`` and ``ds.batch(indices)`` → (B, C, H, W) in [-1, 1].

- ``petals``: the embedded procedural flowers (:mod:`deftcli.petals`), no files needed;
- ``flowers102``: torchvision's Flowers102 (centre crop to the short side, bilinear resize, [-1, 1]);
  ``train`` is the union of its train and test splits, ``val`` its validation split;
- ``folder``: any folder of images, recursively (hidden files and folders skipped); centre crop and
  resize (images whose short side is below the prior's size are upscaled, with a warning on stderr);
  a deterministic split by a hash of each file's relative path (10 % val, 10 % test, the rest train).

:class:`MeasurementSource` turns them into fine-tuning batches of measurements y = A x + σ_y η.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .distributed import Distributed, is_main_process
from .errors import DeftError
from .images import IMAGE_SUFFIXES, read_image, read_measurement
from .operators import Operator
from .prior_interface import Prior
from .specs import DataSpec, FinetuneSpec

SPLITS = ("train", "val", "test")


class ImageDataset(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> Tensor: ...


def center_crop_resize(x: Tensor, size: int) -> Tensor:
    """Centre-crop a (C, H, W) image to its short side and resize it bilinearly (antialiased) to size×size."""
    _, h, w = x.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top : top + side, left : left + side]
    if side == size:
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(
        -1, 1
    )


def match_channels(x: Tensor, channels: int, where: str) -> Tensor:
    """Grey → RGB by repetition is allowed for data sets; RGB → grey uses the luma weights."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1)
    if x.shape[0] == 3 and channels == 1:
        return 0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3]
    raise DeftError(f"{where}: cannot convert {x.shape[0]} channels to {channels}")


def split_of(name: str) -> str:
    """Deterministic split of a file by the SHA-1 of its relative path: 80 % train, 10 % val, 10 % test."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


class FolderDataset:
    """Images found recursively under a folder, split deterministically by file-name hash."""

    def __init__(self, root: str | Path, split: str, size: int, channels: int) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DeftError(f"image folder '{root}': no such folder")
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            # hidden files and folders are not data: macOS "._x.jpg" resource forks, .ipynb_checkpoints/ copies
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise DeftError(f"image folder '{root}': no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.files = [p for p in files if split_of(p.relative_to(root).as_posix()) == split]
        if not self.files:
            raise DeftError(f"image folder '{root}': none of its {len(files)} images fall in the '{split}' split")
        smaller = 0
        for path in self.files:  # headers only, so a file that is no image fails now, not hours into a run
            try:
                with Image.open(path) as image:
                    smaller += min(image.size) < size
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise DeftError(
                    f"image folder '{root}': {path} is not an image Pillow can read ({type(exc).__name__})"
                ) from None
        if smaller and is_main_process():  # once per job, not once per torchrun rank
            print(
                f"deft: warning: image folder '{root}': {smaller} of the {len(self.files)} {split} images "
                "have a short side below "
                f"{size} px and are upscaled to {size}×{size}",
                file=sys.stderr,
            )
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: Sequence[int]) -> Tensor:
        return torch.stack(
            [
                center_crop_resize(
                    match_channels(read_image(self.files[i]), self.channels, str(self.files[i])), self.size
                )
                for i in indices
            ]
        )


def open_dataset(spec: DataSpec, split: str, image_size: int, channels: int = 3) -> ImageDataset:
    """The data set named by ``spec`` for ``split`` at the prior's image size."""
    if split not in SPLITS:
        raise DeftError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
    if spec.dataset == "petals":
        from .petals import PetalsDataset

        if channels != 3:
            raise DeftError(f"the petals data set is RGB but the prior has {channels} channel(s)")
        return PetalsDataset(split, image_size)
    if spec.dataset == "folder":
        if spec.root is None:
            raise DeftError("--dataset folder needs --data-root DIR")
        return FolderDataset(spec.root, split, image_size, channels)
    from .flowers import Flowers102Dataset

    return Flowers102Dataset(spec.root, split, image_size, channels)


@dataclass
class Batch:
    """One training batch: M measurements, each repeated for its K trajectories."""

    y: Tensor  # (M·K, *measurement_shape)
    groups: Tensor  # (M·K,) measurement index of each trajectory
    y_unique: Tensor  # (M, ...)
    x_true: Tensor | None  # (M, C, H, W) ground truth when known


class MeasurementSource:
    """Amortised: fresh train images and noise each step; per-measurement: the one given y."""

    def __init__(self, spec: FinetuneSpec, prior: Prior, operator: Operator, device: torch.device) -> None:
        self.spec, self.operator, self.device = spec, operator, device
        self.expected = operator.measurement_shape(prior.image_shape)
        self.fixed: Tensor | None = None
        self.dataset: ImageDataset | None = None
        if spec.measurement is not None:
            y = read_measurement(spec.measurement)
            check_measurement_shape(y, self.expected, prior.image_shape, spec.measurement, operator)
            self.fixed = y[None].to(device)
        else:  # a prior that draws its own images exactly (an analytic one) trains on its samples
            own = prior.dataset("train")
            channels, _, size = prior.image_shape
            self.dataset = own if own is not None else open_dataset(spec.data, "train", size, channels)

    @property
    def per_measurement(self) -> bool:
        return self.fixed is not None

    def global_batch(self) -> int:
        """Trajectories per step over all processes: M·K amortised, K per measurement."""
        return self.spec.trajectories * (1 if self.fixed is not None else self.spec.measurements_per_batch)

    def draw(self, data_gen: torch.Generator, ctx: Distributed) -> Batch:
        """This rank's share of the global batch of M measurements × K trajectories.

        Image indices and measurement noise are drawn for the whole global batch from ``data_gen``
        (identical on every rank); each rank renders and keeps only its measurements.
        """
        k = self.spec.trajectories
        if self.fixed is not None:
            rows = ctx.rows(k, "--trajectories")
            n = rows.stop - rows.start
            groups = torch.zeros(n, dtype=torch.long, device=self.device)
            return Batch(self.fixed.expand(n, *self.fixed.shape[1:]), groups, self.fixed, None)
        assert self.dataset is not None
        m = self.spec.measurements_per_batch
        rows = ctx.rows(m, "--measurements-per-batch")
        idx = torch.randint(len(self.dataset), (m,), generator=data_gen)
        noise = torch.randn((m, *self.expected), generator=data_gen)
        x_true = self.dataset.batch(idx[rows].tolist())
        y = (self.operator.A(x_true) + self.operator.sigma * noise[rows]).to(self.device)
        groups = torch.arange(m, device=self.device)[rows].repeat_interleave(k)
        return Batch(y.repeat_interleave(k, dim=0), groups, y, x_true)


def check_measurement_shape(
    y: Tensor, expected: tuple[int, ...], image_shape: tuple[int, ...], where: Any, operator: Operator
) -> None:
    """A measurement must have the shape the operator produces for the prior's images."""
    if tuple(y.shape) != tuple(expected):
        kind = "channels" if y.shape[0] != expected[0] else "size"
        raise DeftError(
            f"{where}: measurement has shape {tuple(y.shape)} but {operator.describe()} of the prior's "
            f"{tuple(image_shape)} images gives {tuple(expected)} (wrong {kind})"
        )
