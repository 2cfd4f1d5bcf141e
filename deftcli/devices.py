"""Device selection and how the networks run on it: mixed precision (bf16 autocast) and compiled graphs.

Mixed precision is confined to the networks: :meth:`Runtime.network` runs a network call under
``torch.autocast(device, bfloat16)`` and returns float32, so the SDE arithmetic, the RND terms, the
VarGrad variance and the optimiser stay in float32. ``precision: auto`` is bf16 on a CPU with native
bf16 arithmetic (AMX-BF16 or AVX512-BF16) and float32 everywhere else; bf16 asked for on a CPU
without it runs, emulated and slower, with a one-line warning (the numbers are the same arithmetic).
"""

from __future__ import annotations

import functools
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import DeftError

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of x86 CPUs that compute in bf16 natively (oneDNN's AMX and AVX512-BF16 kernels)."""
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "bf16")
"""The instruction-set flags a run records (``bf16`` is the aarch64 flag)."""

F = TypeVar("F", bound=Callable[..., Any])


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


@dataclass(frozen=True)
class CPUFeatures:
    """What this CPU offers the networks: torch's vector ISA and the relevant /proc/cpuinfo flags."""

    model: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, …
    flags: tuple[str, ...]  # the REPORTED_FLAGS present
    mkldnn_bf16: bool  # torch's oneDNN bf16 check (true from AVX512 on, where bf16 is converted in registers)

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16_FLAGS)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "torch_capability": self.capability,
            "flags": list(self.flags),
            "native_bf16": self.native_bf16,
            "mkldnn_bf16": self.mkldnn_bf16,
        }


@functools.cache
def cpu_features() -> CPUFeatures:
    """The CPU's features (Linux reads /proc/cpuinfo; elsewhere no flags are known, so bf16 counts as not native)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and value.strip():
                model = value.strip()
    mkldnn_bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    reported = tuple(f for f in REPORTED_FLAGS if f in flags)
    return CPUFeatures(model, torch.backends.cpu.get_cpu_capability(), reported, mkldnn_bf16)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision the networks run in on ``device``: ``auto`` → bf16 on a CPU with native bf16, else fp32.

    bf16 on a CPU without native bf16 runs (emulated, several times slower) after a one-line warning on
    stderr; on MPS it is refused (not supported here).
    """
    if requested == "auto":
        return "bf16" if device.type == "cpu" and cpu_features().native_bf16 else "fp32"
    if requested == "bf16" and device.type == "mps":
        raise DeftError("--precision bf16 runs on CUDA and on the CPU, not on MPS (use fp32 or --device cpu)")
    if requested == "bf16" and device.type == "cpu" and not cpu_features().native_bf16:
        warn_emulated_bf16()
    return requested


@functools.cache
def warn_emulated_bf16() -> None:
    """Once per process: bf16 on a CPU that has to emulate it."""
    print(
        f"deft: warning: this CPU ({cpu_features().capability}) has no native bf16 (AMX-BF16 or AVX512-BF16): "
        "bf16 is emulated and slower than fp32 (benchmarks/results/speed.json)",
        file=sys.stderr,
    )


def refuse_compile_without_compiler(device: torch.device) -> None:
    """Inductor's CPU code needs a C++ compiler: without one, a one-line error now, not a traceback later."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise DeftError(
            "--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH for torch.compile; "
            "install one or drop --compile"
        )


@dataclass(frozen=True)
class Runtime:
    """How the networks run: the device, the precision they compute in, and whether their graphs are compiled."""

    device: torch.device
    precision: str = "fp32"  # resolved: fp32 or bf16
    compile: bool = False
    requested_precision: str = "fp32"

    @classmethod
    def resolve(cls, device: torch.device, precision: str = "auto", compile: bool = False) -> "Runtime":
        if compile:
            refuse_compile_without_compiler(device)
        return cls(device, resolve_precision(precision, device), compile, precision)

    def network(self, call: F) -> F:
        """``call`` adapted: under bf16 autocast with float32 outputs, and compiled (inductor, static shapes).

        Static shapes compile once per batch size; a sampler's batch size and the fine-tuning batch
        each cost one compilation (``benchmarks/results/speed.json`` has the seconds).
        """
        if self.precision == "bf16":
            call = in_bf16(call, self.device.type)
        return torch.compile(call, dynamic=False) if self.compile else call  # type: ignore[return-value]

    def adapt(self, *modules: Any) -> None:
        """Route each prior's score and each h-network's forward through :meth:`network` (after any ``.to(device)``)."""
        if self.precision != "fp32" or self.compile:
            for module in modules:
                module.run_networks_with(self.network)

    def describe(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "precision": self.precision,
            "precision_requested": self.requested_precision,
            "compile": self.compile,
        }
        if self.device.type == "cpu":
            record["cpu"] = cpu_features().describe()
        return record


def in_bf16(call: F, device_type: str) -> F:
    """call(*args) under ``torch.autocast(device_type, bfloat16)``, its tensor output cast back to float32."""

    @functools.wraps(call)
    def autocast_call(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = call(*args, **kwargs)
        return out.float()

    return autocast_call  # type: ignore[return-value]
