"""Multi-process training through PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node=N -m glmlab train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; this module
turns them into a process group (gloo on CPU, NCCL on CUDA) and offers the few collectives the
trainer needs. A plain ``glmlab train`` is world size 1 and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glmlab.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank (keeps stop decisions in lockstep)."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def from_environment() -> Distributed:
    """The process's place in a torchrun job (world size 1 when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(info: Distributed, device: torch.device) -> torch.device:
    """Join the process group; on CUDA each process takes the GPU of its local rank."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {info.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                              "use --nproc_per_node no larger than the number of GPUs")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier(info: Distributed) -> None:
    """Wait until every process gets here (before tearing the group down: a process that destroys it while
    another is still in its last collective can make that one abort)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def teardown(info: Distributed) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
