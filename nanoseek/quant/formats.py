"""Weight formats: one object per way of storing a weight matrix W [N, K] (N outputs, K inputs),
registered in FORMATS, and the swap that puts a format's modules into a built model.

    fmt = FORMATS["int4"]                        # weight_format(name) names the choices on a typo
    parts = fmt.quantize(w, group_size=128)      # {"": packed, "_scale": ..., "_min": ...}
    w_hat = fmt.dequantize(parts)                # W = q * scale + wmin per group, q in 0..15
    fmt.stored_shapes((N, K), 128)               # the shapes a well-formed stored weight has
    quantize_model(model, "int8")                # nn.Linear -> Int8Linear, Experts -> Int8Experts

On disk a quantized weight keeps its DeepSeek key and its companions sit beside it:

    format  <key> (e.g. ...q_a_proj.weight)       companions
    int8    int8 [N, K]                            <key>_scale fp32 [N]           (per output channel)
    int4    uint8 [N, K/2], two codes per byte      <key>_scale fp32 [N, K/g], <key>_min fp32 [N, K/g]
            (low nibble = even column, high = odd)
    fp8     float8_e4m3fn [N, K]                    <key>_scale_inv fp32 [ceil(N/128), ceil(K/128)]
                                                    (DeepSeek-V3's own layout)

The int4 group size g is recorded in config.json (quantization_config.group_size). int8 and int4
stay quantized in memory (modules.py); fp8 checkpoints load dequantized. Every bound the tests
check is stated where the rounding happens.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..model import Experts, Transformer
from .modules import (INT4_GROUP_SIZES, Int4Experts, Int4Linear, Int8Experts, Int8Linear, int4_group_size,
                      int4_pack, int4_unpack)

__all__ = ["FORMATS", "INT4_GROUP_SIZES", "FP8_BLOCK", "WeightFormat", "weight_format", "error_stats",
           "int8_quantize", "int8_dequantize", "int4_quantize", "int4_dequantize", "int4_group_size", "int4_pack",
           "int4_unpack", "fp8_block_quantize", "fp8_block_dequantize", "is_kept", "swap_modules", "quantize_model"]

FP8_BLOCK = 128


# ----------------------------------------------------------------------------- int8

def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q int8 [N, K], scale fp32 [N]): symmetric, one scale per output channel.

    scale = max|W_n| / 127, q = round(W / scale): every element is off by at most scale / 2.
    """
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


# ----------------------------------------------------------------------------- int4

def int4_quantize(w: torch.Tensor, group_size: int = 128, what: str = "weight"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (packed uint8 [N, K/2], scale fp32 [N, K/g], wmin fp32 [N, K/g]).

    Asymmetric per group of g inputs: the 16 codes span [min, max] of the group, so
    W = q * scale + wmin with scale = (max - min) / 15; every element is off by at most scale / 2.
    """
    N, K = w.shape
    g = int4_group_size(K, group_size, what)
    groups = w.float().view(N, K // g, g)
    wmin, wmax = groups.amin(-1), groups.amax(-1)
    scale = ((wmax - wmin) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - wmin[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    return int4_pack(q), scale, wmin


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = int4_unpack(packed).float()
    N, K = q.shape
    G = scale.shape[1]
    w = q.view(N, G, K // G) * scale.float()[..., None] + wmin.float()[..., None]
    return w.view(N, K).to(dtype)


# ----------------------------------------------------------------------------- FP8 blocks

def fp8_block_quantize(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [M, N] -> (float8_e4m3fn [M, N], weight_scale_inv fp32 [ceil(M/b), ceil(N/b)]).

    Each block x block tile is scaled so its largest magnitude maps to e4m3's max (448);
    scale_inv is what multiplies the FP8 values back, as in DeepSeek-V3's checkpoints.
    """
    M, N = weight.shape
    pm, pn = -M % block, -N % block
    w = torch.nn.functional.pad(weight.float(), (0, pn, 0, pm))
    tiles = w.view((M + pm) // block, block, (N + pn) // block, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale_inv[:, None, :, None]).view(M + pm, N + pn)[:M, :N]
    return q.to(torch.float8_e4m3fn), scale_inv


def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = W_fp8 * s for each block x block tile; scale_inv [ceil(M/b), ceil(N/b)] (DeepSeek's layout),
    fp32 (V3) or power-of-two ue8m0 (V4)."""
    M, N = weight.shape
    s = scale_float(scale_inv).repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (weight.float() * s).to(dtype)


def scale_float(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as fp32: float8_e8m0fnu converts itself; ue8m0 exponents stored as uint8 are 2^(e - 127)."""
    return (scale.float() - 127).exp2() if scale.dtype == torch.uint8 else scale.float()


# e2m1 codes 0..15: magnitude by the low 3 bits, sign by the high one
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = 32


# ----------------------------------------------------------------------------- the formats

class WeightFormat:
    """How one format stores a weight W [N, K], and the modules that compute with it in memory.

    name          the key in FORMATS and config.json's quantization_config.quant_method
    stored_dtype  dtype of the stored weight under its own key
    companions    suffixes of the tensors stored beside it (``<key><suffix>``), in the order the
                  modules' setters take them after the weight
    default_keep  dotted name components left high-precision by default ("gate" is the MoE router,
                  never gate_proj; embeddings are looked up, not multiplied: quantizing them saves
                  no decode time)
    in_memory     the weights stay quantized in a loaded model (int8, int4); fp8 loads dequantized
    group_sizes   the group sizes it takes (int4), or () where it has no groups
    """

    name: str
    stored_dtype: torch.dtype
    companions: tuple[str, ...]
    default_keep: tuple[str, ...]
    in_memory = False
    group_sizes: tuple[int, ...] = ()

    def quantize(self, w: torch.Tensor, group_size: int = 128, what: str = "weight") -> dict[str, torch.Tensor]:
        """W -> {suffix: tensor}: '' is the stored weight, the rest its companions."""
        raise NotImplementedError

    def dequantize(self, parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The inverse of quantize."""
        raise NotImplementedError

    def stored_shapes(self, shape: tuple[int, int], group_size: int = 128, what: str = "weight"
                      ) -> dict[str, tuple[int, ...]]:
        """The shapes a well-formed stored weight of logical `shape` [N, K] has, by suffix."""
        raise NotImplementedError

    def ordered(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The weight then its companions: what ``set_quantized`` / ``set_expert`` take."""
        return tuple(parts[s] for s in ("",) + self.companions)

    def layout_hint(self, group_size: int) -> str:
        """What else decides the stored shapes, for error messages (int4: the group size)."""
        return ""

    def config(self, group_size: int = 128, keep: list[str] | None = None) -> dict:
        """What config.json records (``quantization_config``) for weights stored this way."""
        return {"quant_method": self.name,
                "modules_to_not_convert": list(self.default_keep) if keep is None else list(keep)}

    def linear(self, in_features: int, out_features: int, bias: bool, group_size: int, name: str) -> nn.Module:
        """An empty quantized nn.Linear replacement (filled by ``set_quantized``); in_memory formats only."""
        raise NotImplementedError

    def experts(self, n_experts: int, dim: int, inter_dim: int, group_size: int, name: str) -> nn.Module:
        """An empty quantized ``model.Experts`` replacement (filled by ``set_expert``); in_memory formats only."""
        raise NotImplementedError


class Int8Format(WeightFormat):
    """Symmetric int8, one scale per output channel: W = q * scale[:, None]."""

    name, stored_dtype, companions, in_memory = "int8", torch.int8, ("_scale",), True
    default_keep = ("embed_tokens", "gate", "kv_b_proj")

    def quantize(self, w, group_size=128, what="weight"):
        q, scale = int8_quantize(w)
        return {"": q, "_scale": scale}

    def dequantize(self, parts, dtype=torch.float32):
        return int8_dequantize(parts[""], parts["_scale"], dtype)

    def stored_shapes(self, shape, group_size=128, what="weight"):
        N, K = shape
        return {"": (N, K), "_scale": (N,)}

    def linear(self, in_features, out_features, bias, group_size, name):
        return Int8Linear(in_features, out_features, bias)

    def experts(self, n_experts, dim, inter_dim, group_size, name):
        return Int8Experts(n_experts, dim, inter_dim)


class Int4Format(WeightFormat):
    """Asymmetric int4 in groups of g inputs: W = q * scale + wmin, q in 0..15, two codes per byte."""

    name, stored_dtype, companions, in_memory = "int4", torch.uint8, ("_scale", "_min"), True
    default_keep = ("embed_tokens", "gate", "kv_b_proj")
    group_sizes = INT4_GROUP_SIZES

    def quantize(self, w, group_size=128, what="weight"):
        q, scale, wmin = int4_quantize(w, group_size, what)
        return {"": q, "_scale": scale, "_min": wmin}

    def dequantize(self, parts, dtype=torch.float32):
        return int4_dequantize(parts[""], parts["_scale"], parts["_min"], dtype)

    def stored_shapes(self, shape, group_size=128, what="weight"):
        N, K = shape
        groups = K // int4_group_size(K, group_size, what)
        return {"": (N, K // 2), "_scale": (N, groups), "_min": (N, groups)}

    def layout_hint(self, group_size):
        return f" (int4 group size {group_size})"

    def config(self, group_size=128, keep=None):
        return {**super().config(group_size, keep), "group_size": group_size}

    def linear(self, in_features, out_features, bias, group_size, name):
        return Int4Linear(in_features, out_features, group_size, bias, name)

    def experts(self, n_experts, dim, inter_dim, group_size, name):
        return Int4Experts(n_experts, dim, inter_dim, group_size, name)


class Fp8Format(WeightFormat):
    """DeepSeek-V3's FP8: e4m3 weights, one fp32 scale_inv per 128x128 block (``fp8_block_quantize``)."""

    name, stored_dtype, companions = "fp8", torch.float8_e4m3fn, ("_scale_inv",)
    default_keep = ("embed_tokens", "gate", "lm_head", "shared_head")  # as DeepSeek-V3's FP8 checkpoints

    def quantize(self, w, group_size=128, what="weight"):
        q, scale_inv = fp8_block_quantize(w)
        return {"": q, "_scale_inv": scale_inv}

    def dequantize(self, parts, dtype=torch.float32):
        return fp8_block_dequantize(parts[""], parts["_scale_inv"], FP8_BLOCK, dtype)

    def stored_shapes(self, shape, group_size=128, what="weight"):
        N, K = shape
        b = FP8_BLOCK
        return {"": (N, K), "_scale_inv": (-(-N // b), -(-K // b))}

    def config(self, group_size=128, keep=None):
        """DeepSeek-V3's own record of its FP8 format."""
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


class Fp4Format(WeightFormat):
    """DeepSeek-V4's routed experts in its FP8 checkpoints (``expert_dtype: fp4``): e2m1 values, two per
    byte (the first in the low nibble) in int8 [N, K/2], times a power-of-two (ue8m0) scale per
    FP4_GROUP inputs of a row [N, K/32]. Read (dequantized) inside the FP8 format, not a target itself."""

    name, stored_dtype, companions = "fp4", torch.int8, ("_scale_inv",)
    default_keep = ()

    def quantize(self, w, group_size=FP4_GROUP, what="weight"):
        N, K = w.shape
        if K % FP4_GROUP:
            raise ValueError(f"{what}: {K} inputs do not split into FP4 groups of {FP4_GROUP}")
        g = w.float().view(N, K // FP4_GROUP, FP4_GROUP)
        scale = (g.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 6).log2().ceil().exp2()  # |w / scale| <= 6
        v = (g / scale).flatten(1)
        mags = torch.tensor(FP4_VALUES[:8])
        codes = (v.abs().unsqueeze(-1) - mags).abs().argmin(-1) + 8 * (v < 0)
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
        return {"": packed, "_scale_inv": scale.squeeze(-1).to(torch.float8_e8m0fnu)}

    def dequantize(self, parts, dtype=torch.float32):
        u8 = parts[""].view(torch.uint8).long()
        lut = torch.tensor(FP4_VALUES, device=u8.device)
        v = torch.stack((lut[u8 & 15], lut[u8 >> 4]), dim=-1).flatten(-2)  # [N, K]
        s = scale_float(parts["_scale_inv"])
        s = s.repeat_interleave(v.shape[0] // s.shape[0], 0).repeat_interleave(v.shape[1] // s.shape[1], 1)
        return (v * s).to(dtype)

    def stored_shapes(self, shape, group_size=FP4_GROUP, what="weight"):
        N, K = shape
        return {"": (N, K // 2), "_scale_inv": (N, K // FP4_GROUP)}


FORMATS: dict[str, WeightFormat] = {"int8": Int8Format(), "int4": Int4Format(), "fp8": Fp8Format()}
FP4 = Fp4Format()  # only inside V4's FP8 checkpoints (their routed experts)


def weight_format(name: str) -> WeightFormat:
    """FORMATS[name], or a ValueError that lists the formats."""
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """How far a round trip moved W: relative Frobenius error and the largest absolute error."""
    w, w_hat = w.float(), w_hat.float()
    diff = w_hat - w
    return {"rel_error": float(diff.norm() / w.norm().clamp(min=1e-30)), "max_abs_error": float(diff.abs().max())}


# ----------------------------------------------------------------------------- the swap

def is_kept(module_name: str, keep: list[str]) -> bool:
    """True if a fragment of `keep` is a run of whole dotted components of `module_name`."""
    return any(re.search(rf"(^|\.){re.escape(frag)}(\.|$)", module_name) for frag in keep)


def _empty_like(fmt: WeightFormat, name: str, module: nn.Module, group_size: int) -> nn.Module:
    """An empty quantized module of `fmt` shaped like `module` (an nn.Linear or Experts)."""
    if isinstance(module, Experts):
        E, inter, dim = module.gate_proj.shape
        new = fmt.experts(E, dim, inter, group_size, name)
        new.limit = module.limit
        return new
    return fmt.linear(module.in_features, module.out_features, module.bias is not None, group_size, name)


def swap_modules(model: Transformer, method: str, group_size: int = 128,
                 keep: list[str] | None = None) -> dict[str, nn.Module]:
    """Replace every nn.Linear / Experts whose name `keep` does not match by an empty quantized
    module (on the same device, meta included). Returns {name: original module} for the caller to fill."""
    fmt = weight_format(method)
    if not fmt.in_memory:
        held = " or ".join(repr(n) for n, f in FORMATS.items() if f.in_memory)
        raise ValueError(f"unknown quantization method {method!r}; weights held quantized in memory are {held} "
                         f"({method} checkpoints load dequantized)")
    keep = list(fmt.default_keep) if keep is None else list(keep)
    if model.config.tie_word_embeddings and is_kept("lm_head", keep) != is_kept("model.embed_tokens", keep):
        raise ValueError("lm_head is tied to embed_tokens (tie_word_embeddings): keep both or neither")
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Experts)) or is_kept(name, keep):
            continue
        device = next(module.parameters()).device
        with torch.device(device):
            new = _empty_like(fmt, name, module, group_size)
        if getattr(new, "bias", None) is not None:
            new.bias = nn.Parameter(torch.empty_like(module.bias))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        replaced[name] = module
    return replaced


@torch.no_grad()
def quantize_model(model: Transformer, method: str = "int8", group_size: int = 128,
                   keep: list[str] | None = None) -> Transformer:
    """Quantize a built model's weights in place and return it: weight-only, no calibration data,
    so every routed expert is covered.

    method "int8" (per output channel) or "int4" (asymmetric groups of `group_size` inputs).
    Modules with a name component in `keep` (default: the format's default_keep: embeddings, the
    router, kv_b_proj) stay as they are; norms are never touched.
    """
    replaced = swap_modules(model, method, group_size, keep)
    fmt = FORMATS[method]

    def parts(w, what):  # the on-disk layout's tensors, as the modules' setters take them
        return fmt.ordered(fmt.quantize(w, group_size, what))

    for name, old in replaced.items():
        new = model.get_submodule(name)
        if isinstance(old, Experts):
            for e in range(old.gate_proj.shape[0]):
                new.set_expert(e, *(parts(getattr(old, p)[e], f"{name}.{e}.{p}")
                                    for p in ("gate_proj", "up_proj", "down_proj")))
        else:
            new.set_quantized(*parts(old.weight, name))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    model.config = model.config.replace(quantization_config=fmt.config(group_size, keep))
    return model
