"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import DeftError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeftError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeftError(f"device '{name}' requested but CUDA is not available here (use --device cpu or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeftError(f"device '{name}' requested but MPS is not available here")
    return device


def autocast(device: torch.device, precision: str) -> ContextManager:
    """bf16 autocast for the networks on CUDA; float32 (a no-op context) otherwise.

    The SDE state, the RND sums and the loss are kept in float32 by the callers.
    """
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
