"""SigLIP's vision transformer: DeepSeek-VL's low-resolution (semantic) tower.

    SiglipConfig -> Embeddings (patch conv + learned positions) -> Attention -> MLP -> Layer
    (pre-norm) -> SiglipVisionModel (layers, post-norm; the unused pooling head)

An image [B, 3, S, S] becomes (S/p)^2 patch tokens [B, N, C]; there is no CLS token, and
DeepSeek-VL takes every token of the last layer after the final LayerNorm. Module names are the
checkpoint keys under ``model.vision_model.`` (``embeddings.patch_embedding``,
``encoder.layers.N.self_attn.q_proj``, ``post_layernorm``). Shapes: B images, N patches, C width,
H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SiglipConfig:
    """The SigLIP vision tower's shape (the ``vision_config`` block of a DeepSeek-VL config.json)."""
    hidden_size: int = 1024            # C
    intermediate_size: int = 4096      # MLP width
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 384              # the square view the tower sees
    patch_size: int = 16               # tokens per side = image_size // patch_size
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = False      # the attention-pooling head SigLIP was trained with (unused here)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"SiglipConfig: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"SiglipConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")

    @property
    def grid(self) -> int:
        """Patches per side; the tower emits grid**2 tokens per image."""
        return self.image_size // self.patch_size

    def to_hf(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return dict(d, model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh")

    @classmethod
    def from_hf(cls, d: dict) -> "SiglipConfig":
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config: hidden_act={act!r} is not supported (SigLIP uses gelu_pytorch_tanh)")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw.setdefault("vision_use_head", True)  # transformers' default when the key is absent
        return cls(**kw)


class Embeddings(nn.Module):
    """Non-overlapping p x p patches, linearly embedded (a strided conv), plus a learned position each."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid ** 2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)                                         # [B, N, C], row-major
        return x + self.position_embedding.weight


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        c = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)                              # [B, H, N, C/H]
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, inter)
        self.fc2 = nn.Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Layer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class PoolingHead(nn.Module):
    """SigLIP's attention-pooling head (one learned probe attends over the tokens). DeepSeek-VL
    never runs it; it exists so checkpoints that carry it load and save unchanged."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)


class SiglipVisionModel(nn.Module):
    """pixels [B, 3, S, S] -> tokens [B, (S/p)^2, C] after the final LayerNorm."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = PoolingHead(cfg) if cfg.vision_use_head else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
