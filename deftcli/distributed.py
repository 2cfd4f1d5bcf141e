"""Data parallelism with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

Under ``torchrun --nproc-per-node R -m deftcli finetune …`` every rank runs the same loop on its
share of the global batch: NCCL on CUDA, gloo on CPU. The random streams (measurement images,
noise, gradient steps) are the global batch's, and each rank keeps its rows (a
:class:`~deftcli.samplers.SharedBatchNoise`), so an R-process run follows exactly the single-process run
with the same global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import DeftError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (world size 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, total: int, what: str) -> slice:
        """This rank's contiguous share of ``total`` rows (which must divide evenly)."""
        if total % self.world_size:
            raise DeftError(f"{what} ({total}) must be divisible by the number of processes ({self.world_size})")
        per = total // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, n: int) -> range:
        """Indices of n items for this rank (strided), for evaluation."""
        return range(self.rank, n, self.world_size)

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank: cuda:LOCAL_RANK; CPU ranks share the CPU."""
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (keeps ranks in lock-step on stop decisions)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_values(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's (equal-size) tensor along dim 0, without autograd."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_with_grad(self, tensor: Tensor) -> Tensor:
        """All-gather that carries gradients back to each rank's rows (``torch.distributed.nn``).

        If every rank computes the same loss of the gathered tensor, the gradient that reaches a
        rank's rows is the sum over ranks, i.e. world_size × ∂loss/∂rows; DDP's gradient averaging
        then makes the parameter gradient exact.
        """
        if not self.enabled:
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def no_sync(self, module: torch.nn.Module, sync: bool) -> ContextManager:
        """DDP's ``no_sync`` for all but the last of several backward passes of one step."""
        if self.enabled and not sync:
            return module.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_main_process() -> bool:
    """Rank 0 of a running torchrun job, or the only process: the one that prints warnings."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def setup(device: torch.device) -> Distributed:
    """Join the torchrun job when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    ctx = Distributed(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    return ctx


def teardown(ctx: Distributed) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
