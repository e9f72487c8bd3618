"""SAM-B's image encoder (a ViT-Det): DeepSeek-VL's high-resolution (detail) tower.

    SamConfig -> PatchEmbed -> rel_pos_bias -> Attention -> Layer (windowed or global)
    -> Neck (1x1 conv, LN, 3x3 conv, LN) -> SamVisionEncoder

A 1024x1024 view becomes a 64x64 grid of patch tokens that stays 2-D ([B, h, w, C]) throughout.
Most layers attend inside non-overlapping w x w windows (the grid zero-padded to a multiple of w
after the norm, so padding tokens are attended to, as in SAM); the layers in
``global_attn_indexes`` attend over the whole grid. Every attention adds SAM's decomposed relative
position bias: a learned vector per row offset and per column offset, dotted with the query.
The neck maps C to ``output_channels`` channels-first. Module names are the checkpoint keys under
``model.high_res_vision_model.vision_encoder.``. Shapes: B images, h/w grid rows/columns, C width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SamConfig:
    """SAM's image-encoder shape (the ``high_res_vision_config`` block of a DeepSeek-VL config.json)."""
    hidden_size: int = 768             # C
    output_channels: int = 256         # the neck's channels
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 1024
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    mlp_dim: int = 3072
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    qkv_bias: bool = True

    def __post_init__(self):
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad or not self.global_attn_indexes:
            raise ValueError(f"SamConfig: global_attn_indexes={self.global_attn_indexes} must name layers "
                             f"0..{self.num_hidden_layers - 1}")
        self.global_attn_indexes = list(self.global_attn_indexes)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_hf(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return dict(d, model_type="sam_vision_model", hidden_act="gelu", use_abs_pos=True, use_rel_pos=True)

    @classmethod
    def from_hf(cls, d: dict) -> "SamConfig":
        for key, want in (("hidden_act", "gelu"), ("use_abs_pos", True), ("use_rel_pos", True)):
            if d.get(key, want) != want:
                raise ValueError(f"high_res_vision_config: {key}={d[key]!r} is not supported (SAM-B uses {want!r})")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if kw.get("mlp_dim") is None:
            kw["mlp_dim"] = int(d.get("hidden_size", 768) * d.get("mlp_ratio", 4.0))
        return cls(**kw)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map [B, C, h, w]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels).permute(0, 2, 3, 1)  # [B, h, w, C]


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor) -> torch.Tensor:
    """SAM's decomposed relative-position bias for a square h x w token grid.

    q [b, h, w, d], rel_pos_* [2h-1, d] (offset o = i - j + h - 1) -> bias [b, h*w, h*w]:
    bias[(i, j), (k, l)] = q[i, j] . R_h[i - k] + q[i, j] . R_w[j - l].
    """
    b, h, w, d = q.shape
    if rel_pos_h.shape[0] != 2 * h - 1 or rel_pos_w.shape[0] != 2 * w - 1:
        raise ValueError(f"relative positions {tuple(rel_pos_h.shape)} do not fit a {h}x{w} grid")
    idx_h = torch.arange(h)[:, None] - torch.arange(h)[None, :] + h - 1
    idx_w = torch.arange(w)[:, None] - torch.arange(w)[None, :] + w - 1
    Rh, Rw = rel_pos_h[idx_h], rel_pos_w[idx_w]                      # [h, h, d], [w, w, d]
    bias_h = torch.einsum("bijd,ikd->bijk", q, Rh)                  # [b, h, w, h(k)]
    bias_w = torch.einsum("bijd,jld->bijl", q, Rw)                  # [b, h, w, w(l)]
    bias = bias_h[..., :, None] + bias_w[..., None, :]               # [b, h, w, h, w]
    return bias.reshape(b, h * w, h * w)


class Attention(nn.Module):
    """Multi-head attention over a 2-D grid (a window or the whole image) with relative positions."""

    def __init__(self, cfg: SamConfig, size: int):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, C = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).view(B, h * w, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, hw, d]
        bias = rel_pos_bias(q.reshape(B * H, h, w, -1), self.rel_pos_h, self.rel_pos_w).view(B, H, h * w, h * w)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)   # softmax(q k^T / sqrt(d) + bias) v
        return self.proj(o.transpose(1, 2).reshape(B, h, w, C))


class MLPBlock(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.lin1 = nn.Linear(cfg.hidden_size, cfg.mlp_dim)
        self.lin2 = nn.Linear(cfg.mlp_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def to_windows(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B, h, w, C] -> [B * nh * nw, s, s, C], zero-padding h and w up to multiples of s."""
    B, h, w, C = x.shape
    x = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
    nh, nw = x.shape[1] // s, x.shape[2] // s
    return x.view(B, nh, s, nw, s, C).transpose(2, 3).reshape(-1, s, s, C)


def from_windows(x: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `to_windows`, padding cropped: -> [B, h, w, C]."""
    s, C = x.shape[1], x.shape[-1]
    nh, nw = -(-h // s), -(-w // s)
    x = x.view(B, nh, nw, s, s, C).transpose(2, 3).reshape(B, nh * s, nw * s, C)
    return x[:, :h, :w].contiguous()


class Layer(nn.Module):
    """Pre-norm ViT block whose attention runs inside windows (window > 0) or over the whole grid."""

    def __init__(self, cfg: SamConfig, window: int):
        super().__init__()
        self.window = window
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, window or cfg.grid)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLPBlock(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, _ = x.shape
        a = self.layer_norm1(x)
        if self.window:
            a = from_windows(self.attn(to_windows(a, self.window)), B, h, w)
        else:
            a = self.attn(a)
        x = x + a
        return x + self.mlp(self.layer_norm2(x))


class Neck(nn.Module):
    """[B, h, w, C] -> channels-first [B, out, h, w]: 1x1 conv, LN, 3x3 conv, LN (no biases)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.layer_norm1 = LayerNorm2d(out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.layer_norm2 = LayerNorm2d(out_channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm1(self.conv1(x.permute(0, 3, 1, 2)))
        return self.layer_norm2(self.conv2(x))


class SamVisionEncoder(nn.Module):
    """pixels [B, 3, S, S] -> (neck output [B, out, S/p, S/p], the grid after each layer [B, h, w, C])."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.hidden_size))
        self.layers = nn.ModuleList(
            Layer(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.num_hidden_layers))
        self.neck = Neck(cfg.hidden_size, cfg.output_channels)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)) + self.pos_embed
        per_layer = []
        for layer in self.layers:
            x = layer(x)
            per_layer.append(x)
        return self.neck(x), per_layer


class SamVisionModel(nn.Module):
    """The wrapper whose only child gives the checkpoint its ``vision_encoder.`` prefix."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.vision_encoder = SamVisionEncoder(cfg)

    def forward(self, pixels: torch.Tensor):
        return self.vision_encoder(pixels)
