"""Flowers102 as the original research code prepared it: centre crop to the short side, bilinear
resize to the prior's size (64 in the original), values in [-1, 1].

Splits: ``train`` = Flowers102 train ∪ test (as the original trained its prior), ``val`` = its
validation split (1020 images), ``test`` = its test split. The files are torchvision's layout,
``<root>/flowers-102/{jpg/image_00001.jpg …, setid.mat, imagelabels.mat}``; when they are missing,
torchvision downloads them (online only) and otherwise the error names the missing file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode

from .errors import DeftError

DEFAULT_ROOT = Path.home() / ".cache" / "deft" / "flowers102"
SOURCE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, setid.mat, imagelabels.mat)"
SPLIT_KEYS = {"train": ("trnid", "tstid"), "val": ("valid",), "test": ("tstid",)}


def flowers_transform(img: Image.Image, size: int) -> Tensor:
    """The original pipeline: centre crop to min(W, H), bilinear resize to size×size, [0, 1] → [-1, 1]."""
    img = TF.center_crop(img.convert("RGB"), min(img.size))
    img = TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR)
    return TF.to_tensor(img) * 2 - 1


def missing_files(base: Path) -> list[Path]:
    return [p for p in (base / "setid.mat", base / "imagelabels.mat", base / "jpg") if not p.exists()]


def ensure_downloaded(root: Path) -> Path:
    """The ``flowers-102`` folder under root, downloading it with torchvision when missing and online."""
    base = root / "flowers-102"
    if missing_files(base):
        try:
            from torchvision.datasets import Flowers102

            Flowers102(str(root), split="val", download=True)
        except Exception:  # offline, or the download failed: report what is missing below
            pass
    missing = missing_files(base)
    if missing:
        raise DeftError(f"Flowers102: {missing[0]} is missing (download {SOURCE} into {base}, or pass --data-root DIR holding flowers-102/)")
    return base


class Flowers102Dataset:
    """Flowers102 images by split, transformed like the original code."""

    def __init__(self, root: str | Path | None, split: str, size: int, channels: int = 3) -> None:
        if channels != 3:
            raise DeftError(f"Flowers102 is RGB but the prior has {channels} channel(s)")
        base = ensure_downloaded(Path(root) if root else DEFAULT_ROOT)
        from scipy.io import loadmat

        try:
            set_ids = loadmat(str(base / "setid.mat"), squeeze_me=True)
            ids = [int(i) for key in SPLIT_KEYS[split] for i in set_ids[key].ravel()]
        except (OSError, ValueError, KeyError) as exc:
            raise DeftError(f"{base / 'setid.mat'}: cannot read the split ids ({exc})") from None
        self.files = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: Sequence[int]) -> Tensor:
        images = []
        for i in indices:
            path = self.files[i]
            try:
                with Image.open(path) as img:
                    images.append(flowers_transform(img, self.size))
            except FileNotFoundError:
                raise DeftError(f"Flowers102: {path} is missing (download {SOURCE})") from None
            except (UnidentifiedImageError, OSError) as exc:
                raise DeftError(f"Flowers102: cannot read {path} ({exc})") from None
        return torch.stack(images)
