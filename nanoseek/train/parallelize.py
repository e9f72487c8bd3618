"""Training past one device, applied from outside the single-device model by one function.

    layout = Layout.resolve(world=8, dp_shard=-1, dp_replicate=1, ep=4)
    forward, mesh = parallelize(TrainForward(model), layout, device_type="cuda", bf16=True,
                                activation_checkpointing=True, compile=True)

In this order, as torchtitan does for DeepSeek-V3:
  1. expert parallelism: each MoE layer's routed experts split over an EP group of `ep` consecutive
     ranks (expert_parallel.ExpertParallel: all-to-all dispatch and combine);
  2. activation checkpointing of every block (MTP blocks too);
  3. torch.compile of every block (optional);
  4. FP8 linear layers through torchao (optional, CUDA only);
  5. FSDP2 (``fully_shard``): every block, then the root, over the dense mesh (dp_replicate,
     dp_shard) - HSDP when dp_replicate > 1, plain replication when dp_shard = 1 - with a mixed
     precision policy (bf16 parameters, fp32 gradient reduction). Routed experts are sharded
     separately over the world/ep ranks that hold the same experts ("dp_mod_ep").

Gradients: the loop scales each rank's loss (already a share of the global-batch sum) by the world
size; FSDP2 averages over the world, so dense gradients are the one-process gradient. An expert's
gradient is computed on its owner from every EP peer's tokens (ep shares of the world's), then
averaged over the world/ep ranks of dp_mod_ep: scaled by 1/ep on the way (ScaleGrad; FSDP2's custom
divide factor would do it too, but gloo lacks the PREMUL_SUM it needs), it too comes out as the
one-process gradient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from .expert_parallel import ExpertParallel


@dataclass(frozen=True)
class Layout:
    """How `world` processes split the work: world = dp_replicate × dp_shard; experts over ep ranks."""

    world: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @classmethod
    def resolve(cls, world: int, dp_shard: int = -1, dp_replicate: int = 1, ep: int = 1) -> "Layout":
        """Fill dp_shard = -1 from the world size and check the product; errors name the flag."""
        if dp_replicate < 1 or ep < 1:
            raise ValueError(f"--dp-replicate={dp_replicate} and --ep={ep} must be >= 1")
        if dp_shard == -1:
            dp_shard = world // dp_replicate
        if dp_shard < 1 or dp_replicate * dp_shard != world:
            raise ValueError(f"--dp-replicate={dp_replicate} × --dp-shard={dp_shard} must equal the "
                             f"{world} processes")
        if world % ep:
            raise ValueError(f"--ep={ep} must divide the {world} processes")
        return cls(world, dp_replicate, dp_shard, ep)

    @property
    def dp_mod_ep(self) -> int:
        """Ranks holding the same routed experts (they shard those experts among themselves)."""
        return self.world // self.ep


@dataclass
class Meshes:
    dense: DeviceMesh  # ("dp_replicate", "dp_shard")
    experts: DeviceMesh | None  # ("ep", "dp_mod_ep"): rank r sits at (r % ep, r // ep)
    layout: Layout


class ModelForward(nn.Module):
    """The Transformer's own forward (ids -> logits) under a root module holding it as `.model`, the
    shape parallelize() takes: what GRPO and logit distillation train through."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    dense = init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard),
                             mesh_dim_names=("dp_replicate", "dp_shard"))
    experts = None
    if layout.ep > 1:
        ranks = torch.arange(layout.world).view(layout.dp_mod_ep, layout.ep).t()  # EP groups: consecutive ranks
        experts = DeviceMesh(device_type, ranks, mesh_dim_names=("ep", "dp_mod_ep"))
    return Meshes(dense, experts, layout)


def parallelize(forward: nn.Module, layout: Layout, device_type: str = "cpu", bf16: bool = False,
                activation_checkpointing: bool = False, compile: bool = False, fp8: bool = False
                ) -> tuple[nn.Module, Meshes]:
    """Apply EP, activation checkpointing, compile, FP8 and FSDP2 to `forward` (a module holding the
    Transformer as `.model`, e.g. loop.TrainForward, whose forward calls the model's parts);
    returns the module to call (sharded in place) and the meshes (None for one process: no mesh,
    no FSDP; checkpointing, compile and FP8 still apply)."""
    model = forward.model
    meshes = build_meshes(layout, device_type) if layout.world > 1 else None
    if meshes is not None and meshes.experts is not None:
        apply_expert_parallel(model, meshes.experts["ep"].get_group(), grad_scale=1 / layout.ep)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for layer in model.model.layers:
            layer.compile()
    if fp8:
        apply_fp8(model)
    if meshes is not None:
        apply_fsdp(forward, meshes, bf16)
    return forward, meshes


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup, grad_scale: float = 1.0) -> None:
    for moe in model.moe_layers():
        moe.experts = ExpertParallel(moe.experts, group, grad_scale)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block (MTP blocks too) during backward instead of storing its
    activations. Applied from outside: each block's forward is wrapped, its weights keep their names."""
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def apply_fp8(model: nn.Module, emulate: bool = False) -> None:
    """Swap the blocks' linear layers for torchao's float8 training linears: rowwise (per-row and
    per-column) dynamic scaling, the torchao recipe closest to DeepSeek-V3's fine-grained 1×128
    activation / 128×128 weight blocks, with fp32 accumulation in the gradient matmuls. The embedding,
    the output head, the router and the stacked routed experts stay in high precision (DeepSeek-V3
    keeps embedding, head and gating in BF16/FP32 too). emulate: the float8 casts without float8
    matmuls, so the path runs (slowly) on a CPU - for tests."""
    if not (emulate or torch.cuda.is_available()):
        raise RuntimeError("--fp8 needs a CUDA GPU with float8 matmuls (sm89+)")
    import dataclasses

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name("rowwise"), emulate=emulate)
    convert_to_float8_training(model.model.layers, config=config,
                               module_filter_fn=lambda m, name: m.in_features % 16 == 0 and m.out_features % 16 == 0)


def apply_fsdp(forward: nn.Module, meshes: Meshes, bf16: bool) -> None:
    """fully_shard the routed experts (over dp_mod_ep), every block, then the root (over the dense mesh)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    dense = meshes.dense if meshes.layout.dp_replicate > 1 else meshes.dense["dp_shard"]
    model = forward.model
    if meshes.experts is not None:
        for moe in model.moe_layers():
            fully_shard(moe.experts, mesh=meshes.experts["dp_mod_ep"], mp_policy=mp)
    for layer in model.model.layers:
        if hasattr(layer, "shared_head"):  # an MTP module's output norm is called after its block returns
            fully_shard(layer.shared_head.norm, mesh=dense, mp_policy=mp)
        fully_shard(layer, mesh=dense, mp_policy=mp)
    fully_shard(forward, mesh=dense, mp_policy=mp)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, meshes: Meshes) -> torch.Tensor:
    """The global gradient norm of FSDP/EP-sharded parameters, and clip to max_norm.

    Each rank sums the squares of its local gradient shards; dense shards are counted once per
    replica group (divided by dp_replicate), routed experts' exactly once; the sum is all-reduced
    over the world. torch's clip_grad_norm_ cannot mix DTensors of two meshes, hence this.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        sq = local.double().pow(2).sum().cpu()
        expert = isinstance(g, DTensor) and meshes.experts is not None and g.device_mesh.mesh_dim_names == ("dp_mod_ep",)
        total += sq if expert else sq / meshes.layout.dp_replicate
    dev = grads[0].device if grads else torch.device("cpu")
    total = total.to(dev)
    dist.all_reduce(total)
    norm = total.sqrt()
    coef = min(1.0, max_norm / (float(norm) + 1e-6)) if math.isfinite(max_norm) else 1.0
    if coef < 1.0:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return norm.float().cpu()
