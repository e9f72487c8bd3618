"""Quantized modules and the swap that puts them into a built model; the model code is unchanged.

    model = Transformer(cfg)                            # or load_pretrained(...)
    quantize_(model, "int8")                            # nn.Linear -> Int8Linear, Experts -> QuantExperts
    quantize_(model, "int4", group_size=128, modules_to_not_convert=["embed_tokens", "gate", "lm_head"])

Weights stay quantized in memory; the matrix products are torch's own weight-only kernels:
``torch._weight_int8pack_mm`` (int8, per-channel scale) and ``torch._weight_int4pack_mm_for_cpu``
(int4 groups, weights pre-packed by ``torch._convert_weight_to_int4pack_for_cpu``). Both are fast
only with bf16 activations (fp32 inputs take a reference path measured 10-60x slower on an
AVX-512 CPU), so on CPU the product runs in bf16 and the result is cast back to the input's dtype.
Off the CPU, int8 falls back to ``(x @ q^T) * scale`` (exact, the int8 weight cast on the fly)
and int4 is refused: its kernel-packed layout is CPU-specific here.

``kv_b_proj`` is kept high-precision by default: the absorbed MLA decode reads its dense
``weight`` ([H, dn+dv, R] view). A quantized linear also has a ``weight`` property that
dequantizes, so absorbed decoding still works if you quantize it, at the cost of a dequantize per
call (see BENCHMARKS.md).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Experts, Transformer
from .formats import int4_group_size, int4_quantize, int4_unpack, int8_quantize

# Name fragments (dotted components of a module name) left in high precision by default.
# "gate" is the MoE router (never gate_proj); embeddings are looked up, not multiplied, so
# quantizing them saves memory but no decode time.
DEFAULT_KEEP = {
    "int8": ["embed_tokens", "gate", "kv_b_proj"],
    "int4": ["embed_tokens", "gate", "kv_b_proj"],
    "fp8": ["embed_tokens", "gate", "lm_head", "shared_head"],  # DeepSeek-V3's FP8 layout
}
KERNEL_DTYPE = torch.bfloat16


def is_kept(module_name: str, keep: list[str]) -> bool:
    """True if any fragment of `keep` is a run of whole dotted components of `module_name`."""
    return any(re.search(rf"(^|\.){re.escape(frag)}(\.|$)", module_name) for frag in keep)


class _QuantLinear(nn.Module):
    """Shared plumbing: flatten x to 2-D, run the kernel in bf16 (on CPU), cast back."""

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
        """W dequantized [N, K] in the bias/scale dtype (for code that reads .weight, e.g. absorbed MLA)."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """y = x W^T with W = q * scale[:, None], q int8 [N, K], scale [N] (per output channel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.qweight.copy_(q)
        self.scale.copy_(scale)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.qweight, self.scale.to(KERNEL_DTYPE))
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)  # per-channel scale commutes

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]


class Int4Linear(_QuantLinear):
    """y = x W^T with W = q * scale + wmin per group of g inputs, q in 0..15.

    Held in the CPU kernel's packed layout: qweight uint8 [N', K/2] and scales_and_zeros
    [K/g, N', 2], N' = N rounded up to 16 (the kernel's tile; padded rows are zero, their
    outputs dropped). The kernel reads code q as (q - 8) * scale + zero, so zero = wmin + 8 * scale.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = int4_group_size(in_features, group_size)
        padded = -(-out_features // 16) * 16
        self.register_buffer("qweight", torch.empty(padded, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // self.group_size, padded, 2))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @torch.no_grad()
    def set_quantized(self, packed: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor) -> None:
        """From the on-disk layout (see formats.py): packed [N, K/2], scale/wmin [N, K/g]."""
        if self.qweight.device.type != "cpu":
            raise ValueError("int4 weights run on CPU only here (the kernel's packed layout is CPU-specific)")
        pad = self.qweight.shape[0] - self.out_features
        codes = F.pad(int4_unpack(packed).to(torch.int32), (0, 0, 0, pad))
        self.qweight.copy_(torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        sz = torch.stack((scale.float(), wmin.float() + 8 * scale.float()), dim=-1)  # [N, K/g, 2]
        self.scales_and_zeros.copy_(F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), self.qweight, self.group_size,
                                              self.scales_and_zeros.to(KERNEL_DTYPE))
        return y[:, :self.out_features]

    def dequantize(self) -> torch.Tensor:
        # The kernel applied to the identity gives W^T exactly (to bf16): no second unpacking routine.
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.qweight.device)
        return self._mm(eye).t().to(self.scales_and_zeros.dtype)


class QuantExperts(nn.Module):
    """Drop-in for ``model.Experts``: one quantized linear per expert and projection.

    ``gate_proj[e]``/``up_proj[e]`` map D -> I and ``down_proj[e]`` I -> D; the forward contract
    (x [N, D], weights [N, K], indices [N, K]) -> [N, D] and the sort-by-expert dispatch are
    the same as ``Experts.forward``.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, make_linear):
        super().__init__()
        self.gate_proj = nn.ModuleList([make_linear(dim, inter_dim) for _ in range(n_experts)])
        self.up_proj = nn.ModuleList([make_linear(dim, inter_dim) for _ in range(n_experts)])
        self.down_proj = nn.ModuleList([make_linear(inter_dim, dim) for _ in range(n_experts)])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        N, K = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.gate_proj)).tolist()
        token = order // K
        xs = x[token]  # [N*K, D], grouped by expert
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = xs[start:start + n]
            outs.append(self.down_proj[e](F.silu(self.gate_proj[e](h)) * self.up_proj[e](h)))
            start += n
        ys = torch.cat(outs) * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


# ----------------------------------------------------------------------------- the swap

def linear_factory(method: str, group_size: int = 128):
    """(in_features, out_features, bias) -> an empty quantized linear of `method`."""
    if method == "int8":
        return lambda k, n, bias=False: Int8Linear(k, n, bias)
    if method == "int4":
        return lambda k, n, bias=False: Int4Linear(k, n, group_size, bias)
    raise ValueError(f"unknown quantization method {method!r}; in-memory quantization takes 'int8' or 'int4'")


def swap_modules(model: Transformer, method: str, group_size: int = 128,
                 modules_to_not_convert: list[str] | None = None) -> dict[str, nn.Module]:
    """Replace every nn.Linear / Experts not kept by empty quantized modules (works on meta models).

    Returns {module name: original module} for the modules replaced, so a caller can fill them.
    """
    keep = DEFAULT_KEEP[method] if modules_to_not_convert is None else list(modules_to_not_convert)
    make = linear_factory(method, group_size)
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not name or is_kept(name, keep) or not isinstance(module, (nn.Linear, Experts)):
            continue
        if isinstance(module, nn.Linear):
            new = make(module.in_features, module.out_features, module.bias is not None)
        else:
            E, inter, dim = module.gate_proj.shape
            new = QuantExperts(E, dim, inter, make)
        ref = next(module.parameters())
        new = new.to(device=ref.device, dtype=ref.dtype)  # float buffers follow the model; codes stay integer
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        replaced[name] = module
    return replaced


@torch.no_grad()
def quantize_(model: Transformer, method: str = "int8", group_size: int = 128,
              modules_to_not_convert: list[str] | None = None) -> Transformer:
    """Quantize a built model's weights in place (weight-only, no calibration: every expert included).

    method "int8" (per output channel) or "int4" (groups of `group_size` inputs). Modules whose
    name contains a fragment of `modules_to_not_convert` (default DEFAULT_KEEP[method]) stay as they are.
    """
    if getattr(model.lm_head, "weight", None) is model.model.embed_tokens.weight and \
            not is_kept("lm_head", modules_to_not_convert or DEFAULT_KEEP[method]):
        raise ValueError("lm_head is tied to embed_tokens: keep both or neither (add 'lm_head' to the kept modules)")
    replaced = swap_modules(model, method, group_size, modules_to_not_convert)
    for name, old in replaced.items():
        new = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            _fill(new, old.weight, method, group_size, name)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for e, w in enumerate(getattr(old, proj)):
                    _fill(getattr(new, proj)[e], w, method, group_size, f"{name}.{e}.{proj}")
    model.config = model.config.replace(quantization_config={
        "quant_method": method, "group_size": group_size,
        "modules_to_not_convert": DEFAULT_KEEP[method] if modules_to_not_convert is None
        else list(modules_to_not_convert)})
    return model


def _fill(module: _QuantLinear, w: torch.Tensor, method: str, group_size: int, what: str) -> None:
    if method == "int8":
        module.set_quantized(*int8_quantize(w))
    else:
        module.set_quantized(*int4_quantize(w, group_size, what))
