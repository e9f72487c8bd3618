"""Weight formats: how one weight matrix W [N, K] (N outputs, K inputs) is stored, and back.

    q, scale = int8_quantize(w)                # per output channel, symmetric
    w ≈ int8_dequantize(q, scale)              # W = q * scale[:, None]
    q, scale, wmin = int4_quantize(w, 128)     # groups of 128 inputs, asymmetric (min/max)
    w ≈ int4_dequantize(q, scale, wmin)        # W = q * scale + wmin per group, q in 0..15

On disk a quantized weight keeps its DeepSeek key and its companions sit beside it:

    format  <key> (e.g. ...q_a_proj.weight)       companions
    int8    int8 [N, K]                            <key>_scale fp32 [N]
    int4    uint8 [N, K/2], two codes per byte      <key>_scale fp32 [N, K/g], <key>_min fp32 [N, K/g]
            (low nibble = even column, high = odd)
    fp8     float8_e4m3fn [N, K]                    <key>_scale_inv fp32 [ceil(N/128), ceil(K/128)]
                                                    (DeepSeek-V3's own layout, checkpoint.fp8_block_*)

The int4 group size g is recorded in config.json (quantization_config.group_size). Every
bound the tests check is stated where the rounding happens.
"""

from __future__ import annotations

import torch

from ..checkpoint import FP8_BLOCK, fp8_block_dequantize, fp8_block_quantize

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel accepts

# Companion tensors of each stored format, as suffixes of the weight's key.
COMPANIONS = {"int8": ("_scale",), "int4": ("_scale", "_min"), "fp8": ("_scale_inv",)}
STORED_DTYPE = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}


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

def int4_group_size(in_features: int, group_size: int, what: str = "weight") -> int:
    """The group size used for a matrix of K inputs: group_size, or K itself if K is smaller."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: the int4 kernels take {INT4_GROUP_SIZES}")
    g = min(group_size, in_features)
    if g not in INT4_GROUP_SIZES or in_features % g:
        raise ValueError(f"{what}: {in_features} inputs cannot be split into int4 groups of {group_size} "
                         f"(sizes {INT4_GROUP_SIZES}); keep it in high precision or pick another group size")
    return g


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


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 -> [N, K/2], column 2j in the low nibble, 2j+1 in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(1)


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = int4_unpack(packed).float()
    N, K = q.shape
    G = scale.shape[1]
    w = q.view(N, G, K // G) * scale.float()[..., None] + wmin.float()[..., None]
    return w.view(N, K).to(dtype)


# ----------------------------------------------------------------------------- one table for all

def quantize_weight(fmt: str, w: torch.Tensor, group_size: int = 128, what: str = "weight"
                    ) -> dict[str, torch.Tensor]:
    """W -> {suffix: tensor}: '' is the stored weight, the rest its companions (see COMPANIONS)."""
    if fmt == "int8":
        q, scale = int8_quantize(w)
        return {"": q, "_scale": scale}
    if fmt == "int4":
        q, scale, wmin = int4_quantize(w, group_size, what)
        return {"": q, "_scale": scale, "_min": wmin}
    if fmt == "fp8":
        q, scale_inv = fp8_block_quantize(w)
        return {"": q, "_scale_inv": scale_inv}
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(COMPANIONS)}")


def dequantize_weight(fmt: str, parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize_weight."""
    if fmt == "int8":
        return int8_dequantize(parts[""], parts["_scale"], dtype)
    if fmt == "int4":
        return int4_dequantize(parts[""], parts["_scale"], parts["_min"], dtype)
    if fmt == "fp8":
        return fp8_block_dequantize(parts[""], parts["_scale_inv"], FP8_BLOCK, dtype)
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(COMPANIONS)}")


def stored_shapes(fmt: str, shape: tuple[int, int], group_size: int = 128, what: str = "weight"
                  ) -> dict[str, tuple[int, ...]]:
    """The shapes a well-formed stored weight of logical `shape` [N, K] has, by suffix."""
    N, K = shape
    if fmt == "int8":
        return {"": (N, K), "_scale": (N,)}
    if fmt == "int4":
        groups = K // int4_group_size(K, group_size, what)
        return {"": (N, K // 2), "_scale": (N, groups), "_min": (N, groups)}
    if fmt == "fp8":
        b = FP8_BLOCK
        return {"": (N, K), "_scale_inv": (-(-N // b), -(-K // b))}
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(COMPANIONS)}")


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """How far a round trip moved W: relative Frobenius error and the largest absolute error."""
    w, w_hat = w.float(), w_hat.float()
    diff = w_hat - w
    return {"rel_error": float(diff.norm() / w.norm().clamp(min=1e-30)), "max_abs_error": float(diff.abs().max())}
