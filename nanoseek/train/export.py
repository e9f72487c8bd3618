"""Full weights out of a sharded (FSDP2 / expert-parallel) run, one parameter at a time.

    for name, full in full_tensors(model, expert_mesh):    # every rank, in the same order
        ...
    copy_full_weights(model, plain_copy, expert_mesh)      # GRPO's rollout copy after each step
    stats = save_hf_sharded(model, folder, expert_mesh)    # every rank writes its part of the export

No rank ever holds the whole model. `full_tensors` all-gathers one parameter (its FSDP shards, then
its expert-parallel slices) and drops it before the next. `save_hf_sharded` makes each parameter the
property of one rank (the least-loaded so far, in bytes, decided alike on every rank from the global
shapes); the owner keeps it until its buffer reaches `max_shard_size`, writes a safetensors file and
starts another, so a rank holds at most one buffer plus the parameter being gathered (the `peak_bytes`
it returns). Rank 0 then names the files model-i-of-N, writes the index and config.json: a plain
Hugging Face checkpoint, every rank's files in one folder (a filesystem all ranks share, as
torch.distributed.checkpoint already needs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from ..hf.io import parse_size, write_index
from ..hf.keys import hf_tensors


def is_expert_slice(name: str, t: torch.Tensor, expert_mesh) -> bool:
    """A routed-experts tensor split over the EP group ([E/ep, ...] on each rank)."""
    return expert_mesh is not None and ".experts." in name and t.dim() == 3


def full_tensors(model: nn.Module, expert_mesh=None):
    """(name, full tensor) for every state-dict entry, gathered one at a time on every rank (each
    rank must iterate to the end: every step is a collective)."""
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if is_expert_slice(name, full, expert_mesh):
            parts = [torch.empty_like(full) for _ in range(expert_mesh.shape[0])]
            dist.all_gather(parts, full.contiguous(), group=expert_mesh.get_group("ep"))
            full = torch.cat(parts)
        yield name, full.detach()


@torch.no_grad()
def copy_full_weights(model: nn.Module, plain: nn.Module, expert_mesh=None) -> None:
    """Copy a sharded model's weights (buffers too) into an unsharded copy of it, one at a time."""
    target = plain.state_dict()
    for name, full in full_tensors(model, expert_mesh):
        target[name].copy_(full)


def save_hf_sharded(model: nn.Module, folder: str | os.PathLike, expert_mesh=None,
                    max_shard_size: int | str = "5GB") -> dict:
    """Every rank: write this rank's share of `model` as safetensors files into `folder` (which must
    exist); rank 0 also writes the index and config.json. Returns this rank's {"files", "peak_bytes",
    "total_bytes"}: the most bytes of weights it held at once, against the whole model's."""
    folder, rank, world = Path(folder), dist.get_rank(), dist.get_world_size()
    cfg, limit = model.config, parse_size(max_shard_size)
    load, held, files = [0] * world, {}, []
    held_bytes = peak = total = 0

    def flush():
        nonlocal held_bytes
        if held:
            name = f"rank{rank:05d}-{len(files):05d}.safetensors"
            save_file(held, str(folder / name), metadata={"format": "pt"})
            files.append((name, {k: v.numel() * v.element_size() for k, v in held.items()}))
            held.clear()
            held_bytes = 0

    for name, full in full_tensors(model, expert_mesh):
        nbytes = full.numel() * full.element_size()
        total += nbytes
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += nbytes
        peak = max(peak, held_bytes + nbytes)
        if owner == rank:
            tensors = {k: v.to("cpu").contiguous() for k, v in hf_tensors(cfg, name, full).items()}
            size = sum(v.numel() * v.element_size() for v in tensors.values())
            if held and held_bytes + size > limit:
                flush()
            held.update(tensors)
            held_bytes += size
            peak = max(peak, held_bytes)
        del full
    flush()
    listing = [None] * world
    dist.all_gather_object(listing, files)
    if rank == 0:
        _name_shards(folder, [f for per_rank in listing for f in per_rank], cfg, model.state_dict())
    dist.barrier()
    return {"files": [f for f, _ in files], "peak_bytes": peak, "total_bytes": total}


def _name_shards(folder: Path, files: list, cfg, state: dict) -> None:
    """Rename every rank's files to model-i-of-N.safetensors; write the index and config.json."""
    weight_map, size = {}, 0
    for i, (name, sizes) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.rename(folder / name, folder / final)
        weight_map.update(dict.fromkeys(sizes, final))
        size += sum(sizes.values())
    write_index(folder, weight_map, size)
    config = dict(cfg.to_hf())
    config.setdefault("torch_dtype", str(next(iter(state.values())).dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
