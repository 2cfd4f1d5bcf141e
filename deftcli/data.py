"""Image data sets behind one small contract: ``len(ds)`` and ``ds.batch(indices)`` → (B, C, H, W) in [-1, 1].

- ``petals``: the embedded procedural flowers (:mod:`deftcli.petals`), no files needed;
- ``flowers102``: torchvision's Flowers102 (centre crop to the short side, bilinear resize, [-1, 1]);
  ``train`` is the union of its train and test splits, ``val`` its validation split;
- ``folder``: any folder of images, recursively (hidden files and folders skipped); centre crop and
  resize (images whose short side is below the prior's size are upscaled, with a warning on stderr);
  a deterministic split by a hash of each file's relative path (10 % val, 10 % test, the rest train).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .distributed import is_main_process
from .errors import DeftError
from .images import IMAGE_SUFFIXES, read_image
from .specs import DataSpec

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
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(-1, 1)


def match_channels(x: Tensor, channels: int, where: str) -> Tensor:
    """Grey → RGB by repetition is allowed for data sets; RGB → grey uses the luma weights."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1)
    if x.shape[0] == 3 and channels == 1:
        return (0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3])
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
            p for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
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
                raise DeftError(f"image folder '{root}': {path} is not an image Pillow can read ({type(exc).__name__})") from None
        if smaller and is_main_process():  # once per job, not once per torchrun rank
            print(f"deft: warning: image folder '{root}': {smaller} of the {len(self.files)} {split} images have a short side below "
                  f"{size} px and are upscaled to {size}×{size}", file=sys.stderr)
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: Sequence[int]) -> Tensor:
        return torch.stack(
            [center_crop_resize(match_channels(read_image(self.files[i]), self.channels, str(self.files[i])), self.size) for i in indices]
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
