"""The primitives every model family shares: the linear layer, RMSNorm and rotary position
embedding with its context-extension variants (linear, Llama-3's, YaRN).

    Linear -> RMSNorm -> rope_frequencies (default | linear | llama3 | yarn) -> apply_rotary -> RotaryEmbedding

``attention.py`` builds MLA and grouped-query attention from these, ``model.py`` the rest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, yarn_mscale
from .kernels import linear


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the same arithmetic in one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- rotary

def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the cos/sin amplitude, for the config's rope_type.

    Every variant starts from theta_i = base^(-2i/d) and rescales the frequencies whose wavelength
    is long against the pretraining context; see the one function per variant below.
    """
    dim = cfg.rope_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return ROPE_SCALING[cfg.rope_type](inv_freq, cfg)


def rope_default(inv_freq: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    return inv_freq, 1.0


def rope_linear(inv_freq: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al. 2023; DeepSeek-Coder's factor 4): every frequency / s."""
    return inv_freq / cfg.rope_factor, 1.0


def rope_llama3(inv_freq: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Llama 3.1's rule (R1-Distill-Llama): wavelengths shorter than orig/high_freq_factor are kept,
    longer than orig/low_freq_factor divided by s, and in between blended by how many times they
    turn over the original context: (orig/wavelength - low) / (high - low)."""
    s, orig = cfg.rope_factor, cfg.original_max_position_embeddings or cfg.max_position_embeddings
    low, high = cfg.low_freq_factor, cfg.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    smooth = ((orig / wavelength - low) / (high - low)).clamp(0, 1)
    return inv_freq / s * (1 - smooth) + inv_freq * smooth, 1.0


def rope_yarn(inv_freq: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023; DeepSeek-V2 appendix): high-frequency dimensions are kept
    (extrapolation), low-frequency ones divided by s (interpolation), with a linear ramp between the
    dimensions that turn beta_fast and beta_slow times over the original context; cos/sin are scaled
    by the attention factor mscale(s, mscale) / mscale(s, mscale_all_dim)."""
    dim, base, s = cfg.rope_dim, cfg.rope_theta, cfg.rope_factor
    orig = cfg.original_max_position_embeddings or cfg.max_position_embeddings

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
    if cfg.mscale and cfg.mscale_all_dim:
        amplitude = yarn_mscale(s, cfg.mscale) / yarn_mscale(s, cfg.mscale_all_dim)
    else:
        amplitude = yarn_mscale(s, 1.0)
    return inv_freq, float(amplitude)


ROPE_SCALING = {"default": rope_default, "linear": rope_linear, "llama3": rope_llama3, "yarn": rope_yarn}


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, (H,) d] by position; cos/sin are [B, T, d/2].

    MLA checkpoints pair dimensions (x0,x1),(x2,x3)...; we de-interleave to the half-split
    layout (Llama's, which every other family uses) first. q and k get the same permutation,
    so q·k is unchanged.
    """
    if interleaved:
        x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    if x.dim() == 4:  # [B, T, H, d]: broadcast over heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.amplitude = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, d/2]
        return (freqs.cos() * self.amplitude).to(dtype), (freqs.sin() * self.amplitude).to(dtype)
