"""Checkpoints as safetensors + JSON, written atomically (temp file + rename).

Model weights are flat ``{name: tensor}`` safetensors files. Training state (optimizer, RNG,
counters) is a nested structure; :func:`save_state` splits it into a safetensors file for the
tensors and a JSON skeleton in the file's metadata, so nothing is ever unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import DeftError
from .images import atomic_write

_TENSOR_REF = "__tensor__"


PAUSE_HOOK = "DEFT_TEST_PAUSE_BEFORE_RENAME"
"""Test-only fault injection, ``NAME:SKIP:SECONDS``: after writing the temporary file of the
(SKIP + 1)-th save of a file called NAME, wait SECONDS before the rename (so a test can kill the
process in the middle of a checkpoint write)."""
_saves: Counter[str] = Counter()


def write_checkpoint_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write atomically (:func:`~deftcli.images.atomic_write`: a failure is one line and leaves the old file as it
    was)."""
    path = Path(path)
    hook = os.environ.get(PAUSE_HOOK)

    def write_then_maybe_pause(tmp: Path) -> None:
        write(tmp)
        _saves[path.name] += 1
        if hook:
            name, skip, seconds = hook.split(":")
            if name == path.name and _saves[path.name] > int(skip):
                time.sleep(float(seconds))

    atomic_write(path, write_then_maybe_pause)


def save_weights(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a flat state dict atomically (contiguous CPU copies)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_checkpoint_file(Path(path), lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a flat state dict and its metadata; a missing, truncated or corrupt file is a DeftError."""
    path = Path(path)
    if not path.is_file():
        raise DeftError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeftError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return tensors, metadata


def _flatten(obj: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {_TENSOR_REF: key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors, prefix), _flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_flatten(v, tensors, prefix) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR_REF in obj:
            return tensors[obj[_TENSOR_REF]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def save_state(state: dict[str, Any], path: Path) -> None:
    """Write a nested training state (dicts, lists, tensors, numbers, strings) atomically."""
    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(state, tensors, "")
    save_weights(tensors, path, metadata={"deft_state": json.dumps(skeleton)})


def load_state(path: Path) -> dict[str, Any]:
    """Inverse of :func:`save_state`."""
    tensors, metadata = load_weights(path)
    if "deft_state" not in metadata:
        raise DeftError(f"{path}: not a deft training-state file")
    return _unflatten(json.loads(metadata["deft_state"]), tensors)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, to identify the exact weights a run used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically, indented."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    write_checkpoint_file(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DeftError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeftError(f"{path}: not valid JSON ({exc})") from None


def rng_state() -> dict[str, Any]:
    """The global torch RNG state (CPU and, when present, CUDA), for exact resume."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
