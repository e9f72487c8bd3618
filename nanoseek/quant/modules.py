"""Quantized modules: int8 / int4 linears and stacked routed experts on CPU kernels.

    lin = Int8Linear(in_features, out_features)          # empty; filled from the on-disk layout:
    lin.set_quantized(q, scale)                          # formats.int8_quantize(w) -> (q, scale)
    experts = Int4Experts(n_experts, dim, inter_dim, group_size=128)
    experts.set_expert(e, gate_parts, up_parts, down_parts)

The swap that puts them into a built model (``quantize_model``) and the choice of module per
format live in formats.py (``FORMATS[name].linear(...)``), so this file knows no format by name.
The int4 code layout (two codes per byte) and the group sizes are here because the kernels
dictate them; formats.py quantizes into that layout.

Weights stay quantized in memory. On a CPU with AVX-512 VNNI the products are nanoseek's own
kernels (``cpu_kernels``: csrc/gemv.cpp, built on the first product; activations quantized in blocks,
integer dot products, split over output rows on torch's threads), at any number of rows (measured
on a 2816 x 2048 weight, one thread: as fast as torch's kernels or faster from 1 to 512 rows).
Wherever the extension is disabled (NANOSEEK_NO_EXT=1) or cannot be built, they are torch's own
weight-only CPU kernels: ``torch._weight_int8pack_mm`` (int8 codes, one bf16 scale per output
channel) and ``torch._weight_int4pack_mm_for_cpu`` (int4 codes in groups, pre-packed by
``torch._convert_weight_to_int4pack_for_cpu``). Those take bf16 activations only (an fp32 input is
refused or, for int8, runs ~7x slower on an AVX-512 CPU), so each product casts its input to bf16
and its output back to the input's dtype: the rest of the model keeps its dtype. Off the CPU
there is no such kernel here: int8 multiplies with the codes cast on the fly (``(x @ q^T) * scale``,
exact) and int4 dequantizes its own layout (``native``) or refuses torch's packed one.

int4 layouts: a module built where the extension may run (``cpu_kernels.enabled()``, which builds
nothing) holds the codes in nanoseek's on-disk layout (``layout == "native"``: uint8 [N, K/2], low
nibble = even column) with scale and zero = wmin + 8 * scale in bf16 [N, K/g] (W = (codes - 8) *
scale + zero: the centred zero loses less to bf16 than wmin would), which the extension reads
directly at any number of rows. Elsewhere it holds torch's packed layout (``layout == "torch"``,
``int4_kernel_layout``). If the extension then fails to build, a native module converts itself to
torch's layout on its first product (once) and runs torch's kernel from then on.
``dequantize()`` / ``expert_weights()`` read either layout.

Routed experts: ``model.Experts`` stacks its weights [E, out, in]; ``Int8Experts``/``Int4Experts``
keep the same stacking, with gate_proj and up_proj fused into one [E, 2I, D] matrix (per-row scales
make the fusion exact), so each chosen expert costs two kernel calls over only the tokens routed
to it; one decoding token runs all its experts in two batched calls where nanoseek's kernels run.
``kv_b_proj`` stays high-precision by default: the absorbed MLA decode reads its dense ``weight``
([H, dn+dv, R] view); quantized linears also expose ``weight`` (dequantized on every read), so
quantizing it works but costs a dequantization per decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import group_by_expert, swiglu
from . import cpu_kernels

KERNEL_DTYPE = torch.bfloat16
INT4_TILE = 16  # the int4 CPU kernel packs output rows in tiles of 16
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel (and nanoseek's) accepts


# ----------------------------------------------------------------------------- int4 codes

def int4_group_size(in_features: int, group_size: int, what: str = "weight") -> int:
    """The group size used for a matrix of K inputs: group_size, or K itself if K is smaller."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: the int4 kernels take {INT4_GROUP_SIZES}")
    g = min(group_size, in_features)
    if g not in INT4_GROUP_SIZES or in_features % g:
        raise ValueError(f"{what}: {in_features} inputs cannot be split into int4 groups of {group_size} "
                         f"(sizes {INT4_GROUP_SIZES}); keep it in high precision or pick another group size")
    return g


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 -> [N, K/2], column 2j in the low nibble, 2j+1 in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(1)


# ----------------------------------------------------------------------------- kernels

def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T with W = q [N, K] * scale [N] (bf16) -> [M, N]: fp32 from nanoseek's kernel
    (CPU), bf16 from torch's (CPU, where the extension cannot run), x's dtype elsewhere."""
    if x.device.type == "cpu":
        y = cpu_kernels.int8_mm(x, q, scale)
        if y is not None:
            return y
        if q.shape[1] % 16:  # torch's bf16 kernel reads K in blocks of 16 and crashes on a remainder: fp32 path
            return torch._weight_int8pack_mm(x.float(), q, scale.float()).to(KERNEL_DTYPE)
        return torch._weight_int8pack_mm(x.to(KERNEL_DTYPE), q, scale)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)  # a per-output-channel scale commutes


def int4_mm(x: torch.Tensor, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] @ W^T with W in the kernel's packed layout (see ``int4_kernel_layout``) -> [M, N'] bf16."""
    if x.device.type != "cpu":
        raise RuntimeError("int4 weights run on CPU only here: torch's packed int4 layout is device-specific")
    return torch._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), q, group_size, scales_and_zeros)


def int4_native_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                   ) -> torch.Tensor | None:
    """x [M, K] @ W^T with W = (codes - 8) * scale + zero, codes in nanoseek's int4 layout (packed uint8
    [N, K/2]), scale/zero bf16 [N, K/g] -> [M, N]: nanoseek's kernel on a CPU (fp32), a dequantized
    product off it (x's dtype), None on a CPU where the extension cannot run (the caller converts
    to torch's layout)."""
    if x.device.type == "cpu":
        return cpu_kernels.int4_mm(x, packed, scale, zero)
    return F.linear(x, int4_weight(packed, scale, zero).to(x.dtype))


def int4_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The native int4 layout -> W fp32 [N, K] = (codes - 8) * scale + zero per group."""
    q = int4_unpack(packed).float() - 8
    N, K = q.shape
    G = scale.shape[-1]
    return (q.view(N, G, K // G) * scale.float()[..., None] + zero.float()[..., None]).view(N, K)


def int4_centred(scale: torch.Tensor, wmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On-disk (scale, wmin) -> the native layout's bf16 (scale, zero = wmin + 8 * scale)."""
    return scale.to(KERNEL_DTYPE), (wmin.float() + 8 * scale.float()).to(KERNEL_DTYPE)


def int4_kernel_layout(packed: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """On-disk int4 (formats.py: packed [N, K/2], scale/wmin [N, G]) -> the CPU kernel's layout:
    (uint8 [N', K/2], scales_and_zeros bf16 [G, N', 2]) with N' = N rounded up to 16 (padded rows
    are zero and their outputs dropped). The kernel reads code q as (q - 8) * scale + zero, so
    zero = wmin + 8 * scale gives back W = q * scale + wmin."""
    N = packed.shape[0]
    pad = -N % INT4_TILE
    codes = F.pad(int4_unpack(packed).to(torch.int32), (0, 0, 0, pad))
    q = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack((scale.float(), wmin.float() + 8 * scale.float()), dim=-1)  # [N, G, 2]
    return q, F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous().to(KERNEL_DTYPE)


# ----------------------------------------------------------------------------- linears

class QuantLinear(nn.Module):
    """Shared plumbing: flatten x to 2-D, run the kernel, add the bias, cast back to x's dtype."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """W dequantized, [N, K] fp32 (for code that reads .weight, e.g. absorbed MLA)."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """y = x W^T with W = q * scale[:, None]: q int8 [N, K], scale bf16 [N] (per output channel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(out_features, dtype=KERNEL_DTYPE))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """From the on-disk layout (formats.py): q int8 [N, K], scale [N]."""
        self.qweight.copy_(q)
        self.scale.copy_(scale)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return int8_mm(x, self.qweight, self.scale)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]


class Int4Linear(QuantLinear):
    """y = x W^T with W = q * scale + wmin per group of g inputs, q in 0..15. Layout ``native``
    (nanoseek's kernel): qweight uint8 [N, K/2] as on disk, scale and zero = wmin + 8 * scale bf16
    [N, K/g]. Layout ``torch`` (``int4_kernel_layout``): qweight uint8 [N', K/2], scales_and_zeros
    bf16 [K/g, N', 2]."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 name: str = "weight"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = int4_group_size(in_features, group_size, name)
        G = in_features // self.group_size
        if cpu_kernels.enabled() and cpu_kernels.shape_ok(in_features):
            self.layout = "native"
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(out_features, G, dtype=KERNEL_DTYPE))
            self.register_buffer("zero", torch.zeros(out_features, G, dtype=KERNEL_DTYPE))
        else:
            self.layout = "torch"
            padded = out_features + (-out_features % INT4_TILE)
            self.register_buffer("qweight", torch.zeros(padded, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales_and_zeros", torch.zeros(G, padded, 2, dtype=KERNEL_DTYPE))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def set_quantized(self, packed: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor) -> None:
        """From the on-disk layout (formats.py): packed uint8 [N, K/2], scale/wmin [N, K/g]."""
        if self.layout == "native":
            self.qweight.copy_(packed)
            for buf, t in zip((self.scale, self.zero), int4_centred(scale, wmin)):
                buf.copy_(t)
            return
        q, sz = int4_kernel_layout(packed, scale, wmin)
        self.qweight.copy_(q)
        self.scales_and_zeros.copy_(sz)

    @torch.no_grad()
    def use_torch_layout(self) -> None:
        """Convert a native module to torch's packed layout, in place (when the extension is unusable)."""
        if self.layout == "torch":
            return
        q, sz = int4_kernel_layout(self.qweight, self.scale, self.zero.float() - 8 * self.scale.float())
        del self.qweight, self.scale, self.zero
        self.register_buffer("qweight", q)
        self.register_buffer("scales_and_zeros", sz)
        self.layout = "torch"

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "native":
            y = int4_native_mm(x, self.qweight, self.scale, self.zero)
            if y is not None:
                return y
            self.use_torch_layout()
        return int4_mm(x, self.qweight, self.scales_and_zeros, self.group_size)[:, :self.out_features]

    def dequantize(self) -> torch.Tensor:
        if self.layout == "native":
            return int4_weight(self.qweight, self.scale, self.zero)
        # The kernel applied to the identity gives W^T: no second unpacking routine to keep in step.
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.qweight.device)
        return self._mm(eye).t().float()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"


# ----------------------------------------------------------------------------- routed experts

class QuantExperts(nn.Module):
    """Drop-in for ``model.Experts`` (x [N, D], weights [N, K], indices [N, K]) -> [N, D].

    Subclasses hold the E experts stacked, gate and up fused: ``_gate_up(h, e)`` -> [n, 2I] and
    ``_down(h, e)`` -> [n, D] run expert e's kernels on the n tokens routed to it.
    """

    n_experts: int
    dim: int
    inter_dim: int
    limit: float | None = None  # DeepSeek-V4's SwiGLU clip, copied from the model's Experts

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # decoding one token: all its experts in two kernel calls where a kernel can
            y = self._one_token(x, weights, indices)
            if y is not None:
                return y
        y = torch.zeros_like(x)
        gates = weights.flatten().unsqueeze(-1)  # [N*K, 1] fp32, pair j = (token j // K, its k-th expert)
        for e, tok, pairs in group_by_expert(indices, self.n_experts):
            gate, up = self._gate_up(x[tok], e).float().split(self.inter_dim, dim=-1)
            h = swiglu(gate, up, self.limit) * gates[pairs]  # the routing weight scales the narrower activation
            if isinstance(tok, slice):  # one token: a slice add, cheaper than index_add_ at decode sizes
                y[tok] += self._down(h, e)
            else:
                y.index_add_(0, tok, self._down(h, e).to(x.dtype))
        return y

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """One token's output through all its chosen experts (indices [1, K]) with two batched products
        (``_gate_up_all`` / ``_down_all``: row i uses expert indices[0, i]), or None where the
        subclass has no such kernel here (then ``forward`` loops over the experts)."""
        if not (cpu_kernels.shape_ok(self.dim) and cpu_kernels.shape_ok(self.inter_dim)):
            return None
        ids = indices[0]
        gate_up = self._gate_up_all(x, ids)
        if gate_up is None:
            return None
        gate, up = gate_up.split(self.inter_dim, dim=-1)
        h = swiglu(gate, up, self.limit) * weights[0].unsqueeze(-1)  # [K, I], each row by its routing weight
        return self._down_all(h, ids).sum(0, keepdim=True).to(x.dtype)

    def _gate_up_all(self, x, ids):
        return None

    def _down_all(self, h, ids):
        raise NotImplementedError

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (gate [I, D], up [I, D], down [D, I]) dequantized to fp32 (tests, inspection)."""
        device = self.down_proj.device
        gate_up = self._gate_up(torch.eye(self.dim, device=device), e).float().t()  # [2I, D]
        down = self._down(torch.eye(self.inter_dim, device=device), e).float().t()  # [D, I]
        return gate_up[:self.inter_dim], gate_up[self.inter_dim:], down

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, dim={self.dim}, inter_dim={self.inter_dim}"


class Int8Experts(QuantExperts):
    """Routed experts in int8: gate_up_proj int8 [E, 2I, D] (+ scale [E, 2I]), down_proj int8 [E, D, I]
    (+ scale [E, D]); one scale per output channel, as ``Int8Linear``."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.register_buffer("gate_up_proj", torch.zeros(n_experts, 2 * inter_dim, dim, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.zeros(n_experts, 2 * inter_dim, dtype=KERNEL_DTYPE))
        self.register_buffer("down_proj", torch.zeros(n_experts, dim, inter_dim, dtype=torch.int8))
        self.register_buffer("down_scale", torch.zeros(n_experts, dim, dtype=KERNEL_DTYPE))

    @torch.no_grad()
    def set_expert(self, e: int, gate: tuple, up: tuple, down: tuple) -> None:
        """Expert e from on-disk int8 parts (q, scale) of gate_proj [I, D], up_proj [I, D], down_proj [D, I]."""
        self.gate_up_proj[e].copy_(torch.cat((gate[0], up[0])))
        self.gate_up_scale[e].copy_(torch.cat((gate[1], up[1])))
        self.down_proj[e].copy_(down[0])
        self.down_scale[e].copy_(down[1])

    def _gate_up(self, h, e):
        return int8_mm(h, self.gate_up_proj[e], self.gate_up_scale[e])

    def _down(self, h, e):
        return int8_mm(h, self.down_proj[e], self.down_scale[e])

    def _gate_up_all(self, x, ids):
        return cpu_kernels.int8_mm_experts(x, self.gate_up_proj, self.gate_up_scale, ids)

    def _down_all(self, h, ids):
        return cpu_kernels.int8_mm_experts(h, self.down_proj, self.down_scale, ids)

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate_up = self.gate_up_proj[e].float() * self.gate_up_scale[e].float()[:, None]
        down = self.down_proj[e].float() * self.down_scale[e].float()[:, None]
        return gate_up[:self.inter_dim], gate_up[self.inter_dim:], down


class Int4Experts(QuantExperts):
    """Routed experts in int4, each matrix in the layout ``Int4Linear`` would pick. ``native``:
    gate_up_proj uint8 [E, 2I, D/2] (+ gate_up_scale, gate_up_zero bf16 [E, 2I, D/g]), down_proj uint8
    [E, D, I/2] (+ down_scale, down_zero bf16 [E, D, I/g]). ``torch`` (``int4_kernel_layout``):
    gate_up_proj [E, 2I', D/2] (+ gate_up_scales_and_zeros [E, D/g, 2I', 2]), down_proj [E, D', I/2]
    (+ down_scales_and_zeros [E, I/g, D', 2]); primes are rounded up to the kernel's tile of 16."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, group_size: int = 128, name: str = "experts"):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.group_size = int4_group_size(dim, group_size, f"{name}.gate_proj/up_proj")
        self.down_group_size = int4_group_size(inter_dim, group_size, f"{name}.down_proj")
        E, Gu, Gd = n_experts, dim // self.group_size, inter_dim // self.down_group_size
        if cpu_kernels.enabled() and cpu_kernels.shape_ok(dim) and cpu_kernels.shape_ok(inter_dim):
            self.layout = "native"
            self.register_buffer("gate_up_proj", torch.zeros(E, 2 * inter_dim, dim // 2, dtype=torch.uint8))
            self.register_buffer("gate_up_scale", torch.zeros(E, 2 * inter_dim, Gu, dtype=KERNEL_DTYPE))
            self.register_buffer("gate_up_zero", torch.zeros(E, 2 * inter_dim, Gu, dtype=KERNEL_DTYPE))
            self.register_buffer("down_proj", torch.zeros(E, dim, inter_dim // 2, dtype=torch.uint8))
            self.register_buffer("down_scale", torch.zeros(E, dim, Gd, dtype=KERNEL_DTYPE))
            self.register_buffer("down_zero", torch.zeros(E, dim, Gd, dtype=KERNEL_DTYPE))
            return
        self.layout = "torch"
        gu, d = 2 * inter_dim + (-2 * inter_dim % INT4_TILE), dim + (-dim % INT4_TILE)
        self.register_buffer("gate_up_proj", torch.zeros(E, gu, dim // 2, dtype=torch.uint8))
        self.register_buffer("gate_up_scales_and_zeros", torch.zeros(E, Gu, gu, 2, dtype=KERNEL_DTYPE))
        self.register_buffer("down_proj", torch.zeros(E, d, inter_dim // 2, dtype=torch.uint8))
        self.register_buffer("down_scales_and_zeros", torch.zeros(E, Gd, d, 2, dtype=KERNEL_DTYPE))

    @torch.no_grad()
    def set_expert(self, e: int, gate: tuple, up: tuple, down: tuple) -> None:
        """Expert e from on-disk int4 parts (packed, scale, wmin) of gate_proj, up_proj, down_proj."""
        gate_up = tuple(torch.cat((g, u)) for g, u in zip(gate, up))
        if self.layout == "native":
            for w, (packed, scale, wmin) in (("gate_up", gate_up), ("down", down)):
                for buf, t in zip(("proj", "scale", "zero"), (packed, *int4_centred(scale, wmin))):
                    getattr(self, f"{w}_{buf}")[e].copy_(t)
            return
        q, sz = int4_kernel_layout(*gate_up)
        self.gate_up_proj[e].copy_(q)
        self.gate_up_scales_and_zeros[e].copy_(sz)
        q, sz = int4_kernel_layout(*down)
        self.down_proj[e].copy_(q)
        self.down_scales_and_zeros[e].copy_(sz)

    @torch.no_grad()
    def use_torch_layout(self) -> None:
        """Convert native experts to torch's packed layout, in place (when the extension is unusable)."""
        if self.layout == "torch":
            return
        for w in ("gate_up", "down"):
            packed, scale, zero = (self._buffers.pop(n) for n in (f"{w}_proj", f"{w}_scale", f"{w}_zero"))
            wmin = zero.float() - 8 * scale.float()
            parts = [int4_kernel_layout(packed[e], scale[e], wmin[e]) for e in range(self.n_experts)]
            self.register_buffer(f"{w}_proj", torch.stack([q for q, _ in parts]))
            self.register_buffer(f"{w}_scales_and_zeros", torch.stack([sz for _, sz in parts]))
        self.layout = "torch"

    def _native(self, h, e, w):
        y = int4_native_mm(h, getattr(self, f"{w}_proj")[e], getattr(self, f"{w}_scale")[e],
                           getattr(self, f"{w}_zero")[e])
        if y is None:
            self.use_torch_layout()
        return y

    def _gate_up_all(self, x, ids):
        if self.layout != "native":
            return None
        return cpu_kernels.int4_mm_experts(x, self.gate_up_proj, self.gate_up_scale, self.gate_up_zero, ids)

    def _down_all(self, h, ids):
        return cpu_kernels.int4_mm_experts(h, self.down_proj, self.down_scale, self.down_zero, ids)

    def _gate_up(self, h, e):
        if self.layout == "native" and (y := self._native(h, e, "gate_up")) is not None:
            return y
        y = int4_mm(h, self.gate_up_proj[e], self.gate_up_scales_and_zeros[e], self.group_size)
        return y[:, :2 * self.inter_dim]

    def _down(self, h, e):
        if self.layout == "native" and (y := self._native(h, e, "down")) is not None:
            return y
        return int4_mm(h, self.down_proj[e], self.down_scales_and_zeros[e], self.down_group_size)[:, :self.dim]

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.layout != "native":
            return super().expert_weights(e)
        gate_up = int4_weight(self.gate_up_proj[e], self.gate_up_scale[e], self.gate_up_zero[e])
        down = int4_weight(self.down_proj[e], self.down_scale[e], self.down_zero[e])
        return gate_up[:self.inter_dim], gate_up[self.inter_dim:], down

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"
