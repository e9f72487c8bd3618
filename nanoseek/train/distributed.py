"""The process group a launch describes: rank, world size, device, and the sums every loop needs.

Launch any training command under torchrun and it trains on every process: each process takes
its slice of the global batch, and parallelize.py shards (FSDP2) or replicates the weights and
splits the routed experts (--ep); the expert loads behind the balancing-bias update are summed
over processes (all_reduce_sum) so every rank moves its biases the same way.

    torchrun --nproc_per_node 2 -m nanoseek pretrain --preset tiny --data arithmetic --steps 100 --out runs/fsdp

gloo on CPU, NCCL on GPU; one process (no torchrun) needs no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over processes (in place; a no-op for one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def share(n: int, env: DistEnv) -> slice:
    """This process's contiguous share of n items, in rank order (shares differ by at most one):
    how GRPO and distillation split a batch of prompts for their rollouts."""
    return slice(env.rank * n // env.world_size, (env.rank + 1) * n // env.world_size)


def all_gather_cat(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate every process's tensor along dim 0 in rank order (equal shapes on every process)."""
    if not env.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every process's picklable `obj`, in rank order ([obj] for one process)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
