"""Data parallelism applied from outside the model: the model code stays single-device.

Launch any training command under torchrun and it trains data-parallel (DDP): each process
takes its slice of the global batch, gradients are averaged by DDP, and the expert loads
behind the balancing-bias update are summed over processes so every replica moves its
biases the same way.

    torchrun --nproc_per_node 2 -m nanoseek pretrain --preset tiny --data arithmetic --steps 100 --out runs/ddp

gloo on CPU, NCCL on GPU; one process (no torchrun) needs no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(device: str | torch.device | None = None) -> DistEnv:
    """Join the process group torchrun describes in WORLD_SIZE/RANK/LOCAL_RANK (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(module: nn.Module, env: DistEnv) -> nn.Module:
    """Wrap for DDP when there are several processes; otherwise return the module as is.

    broadcast_buffers=False: the only buffers that change (balancing biases) are updated
    identically on every process from all-reduced loads, so there is nothing to broadcast.
    """
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over processes (in place; a no-op for one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
