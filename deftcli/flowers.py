"""Flowers102 as the original research code prepared it: centre crop to the short side, bilinear
resize to the prior's size (64 in the original), values in [-1, 1].

Splits: ``train`` = Flowers102 train ∪ test (as the original trained its prior), ``val`` = its
validation split (1020 images), ``test`` = its test split, each in the order of ``setid.mat`` (as
torchvision lists them, so index 3 of ``val`` is the original code's ``val_img_idx = 3``). The files
are torchvision's layout, ``<root>/flowers-102/{jpg/image_00001.jpg …, setid.mat, imagelabels.mat}``.
When none of them is there, torchvision downloads them, but only after a quick connection check (a few
seconds offline, never a hang); a partial copy is never re-downloaded: the error names the missing file.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode

from .errors import DeftError

DEFAULT_ROOT = Path.home() / ".cache" / "deft" / "flowers102"
SOURCE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, setid.mat, imagelabels.mat)"
HOST = "www.robots.ox.ac.uk"
CONNECT_TIMEOUT_S = 5.0
SPLIT_KEYS = {"train": ("trnid", "tstid"), "val": ("valid",), "test": ("tstid",)}


def flowers_transform(img: Image.Image, size: int) -> Tensor:
    """The original pipeline: centre crop to min(W, H), bilinear resize to size×size, [0, 1] → [-1, 1]."""
    img = TF.center_crop(img.convert("RGB"), min(img.size))
    img = TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR)
    return TF.to_tensor(img) * 2 - 1


def missing_files(base: Path) -> list[Path]:
    return [p for p in (base / "setid.mat", base / "imagelabels.mat", base / "jpg") if not p.exists()]


def reachable(host: str = HOST, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the download host opens within ``timeout`` seconds.

    The probe runs in a daemon thread so that a stalled DNS lookup (which ignores socket timeouts)
    cannot hold the caller longer than ``timeout`` either.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="deft-flowers102-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def ensure_downloaded(root: Path) -> Path:
    """The ``flowers-102`` folder under root, downloading it with torchvision when it is absent and online.

    A download is tried only when none of the three parts is there (a fresh download target) and the
    host answers a quick connection check: torchvision's own requests have no timeout, and a partial
    local copy (say, ``jpg/`` without ``setid.mat``) should name what is missing rather than start a
    330 MB download.
    """
    # --data-root may name the flowers-102 folder itself: then its own files count, and a partial copy's error
    # names them
    base = root if root.name == "flowers-102" and len(missing_files(root)) < 3 else root / "flowers-102"
    missing = missing_files(base)
    note = ""
    if len(missing) == 3:
        if reachable():
            try:
                from torchvision.datasets import Flowers102

                Flowers102(str(root), split="val", download=True)
            except Exception as exc:  # the download failed: report what is missing below
                note = f"; the download failed: {' '.join(str(exc).split())[:200]}"
        else:
            note = f"; {HOST} cannot be reached (offline?)"
        missing = missing_files(base)
    if missing:
        raise DeftError(
            f"Flowers102: {missing[0]} is missing{note} (download {SOURCE} into {base}, "
            "or pass --data-root DIR holding flowers-102/)"
        )
    return base


class Flowers102Dataset:
    """Flowers102 images by split, transformed like the original code."""

    def __init__(self, root: str | Path | None, split: str, size: int, channels: int = 3) -> None:
        if channels != 3:
            raise DeftError(f"Flowers102 is RGB but the prior has {channels} channel(s)")
        if split not in SPLIT_KEYS:
            raise DeftError(f"unknown Flowers102 split '{split}' (use {', '.join(SPLIT_KEYS)})")
        base = ensure_downloaded(Path(root) if root else DEFAULT_ROOT)
        from scipy.io import loadmat

        try:
            set_ids = loadmat(str(base / "setid.mat"), squeeze_me=True)
            ids = [int(i) for key in SPLIT_KEYS[split] for i in np.atleast_1d(set_ids[key]).ravel()]
        except Exception as exc:  # a truncated or non-MAT file raises MatReadError, IndexError, ...
            raise DeftError(f"{base / 'setid.mat'}: cannot read the split ids ({type(exc).__name__}: {exc})") from None
        if not ids:
            raise DeftError(f"{base / 'setid.mat'}: the '{split}' split lists no images")
        self.files = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        absent = next((p for p in self.files if not p.is_file()), None)
        if absent is not None:  # fail now, not hours into a run
            raise DeftError(f"Flowers102: {absent} is missing (the '{split}' split lists it; download {SOURCE})")
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
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise DeftError(f"Flowers102: cannot read {path} ({exc})") from None
        return torch.stack(images)
