"""DeepSeek-VL: vision towers + aligner in front of a nanoseek language model.

    VLConfig -> HighResNeck / HighResProj (SAM -> SigLIP grid) -> HybridAligner | Aligner
    -> VisionParts.encode_images -> VLModel.embed (image tokens at <image_placeholder>) -> forward

Two layouts, as published:

    deepseek_vl         SigLIP (384 px) -> MLP aligner (Linear, GELU, Linear) -> D
    deepseek_vl_hybrid  SigLIP (384 px) -> Linear -> D/2 ┐
                        SAM-B (1024 px) -> fused map ->  Linear -> D/2 ┘ concat [SAM ; SigLIP] -> GELU -> Linear -> D

The hybrid's SAM features: the encoder's neck output plus alpha times a second neck applied to the
grid after the first global-attention layer (alpha is learned, zero at initialisation); each
passes through the same projection, which resizes the map bilinearly to 4g x 4g (g = SigLIP's
patches per side) and halves it twice with stride-2 3x3 convolutions, so SAM contributes one
4*out-channel vector per SigLIP token. An image becomes g*g tokens of width D that replace, in
order, the ``image_token_id`` (``<image_placeholder>``) positions of the prompt; the language
model (any nanoseek family; DeepSeek-VL's is DeepSeek-LLM, the llama family) runs on those
embeddings unchanged.

Module names are the checkpoint keys except the language model's: ``language.model.*`` is stored
as ``model.language_model.*`` and ``language.lm_head`` as ``lm_head`` (``hf/vl.py``).
Shapes: I images, N = g*g tokens per image, D the language model's width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import Transformer
from .sam import Neck, SamConfig, SamVisionModel
from .siglip import SiglipConfig, SiglipVisionModel

VL_TYPES = {"deepseek_vl": "DeepseekVLForConditionalGeneration",
            "deepseek_vl_hybrid": "DeepseekVLHybridForConditionalGeneration"}
IMAGE_TOKEN = "<image_placeholder>"


@dataclass
class VLConfig:
    """A vision-language model: the language model's config and the towers'."""
    text: ModelConfig
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    high_res: SamConfig | None = None          # None: deepseek_vl (SigLIP only)
    image_token_id: int = 100015               # <image_placeholder> in DeepSeek-VL's tokenizer
    extra: dict = field(default_factory=dict)  # config.json keys kept to write back

    def __post_init__(self):
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"VLConfig: image_token_id={self.image_token_id} is outside the vocabulary "
                             f"(vocab_size={self.text.vocab_size})")
        if self.high_res is not None and self.text.hidden_size % 2:
            raise ValueError(f"VLConfig: the hybrid aligner halves hidden_size={self.text.hidden_size}; it must be even")

    @property
    def model_type(self) -> str:
        return "deepseek_vl" if self.high_res is None else "deepseek_vl_hybrid"

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image occupies in the prompt (576 for 384 px / 16 px patches)."""
        return self.vision.grid ** 2

    def to_hf(self) -> dict:
        text = self.text.to_hf()
        d = dict(self.extra, architectures=[VL_TYPES[self.model_type]], model_type=self.model_type,
                 text_config=text, vision_config=self.vision.to_hf(), image_token_id=self.image_token_id,
                 tie_word_embeddings=self.text.tie_word_embeddings)
        if self.high_res is not None:
            d["high_res_vision_config"] = self.high_res.to_hf()
        if self.text.torch_dtype is not None:
            d["torch_dtype"] = self.text.torch_dtype
        return d

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "VLConfig":
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type not in VL_TYPES:
            raise ValueError(f"{where}: model_type={model_type!r} is not a DeepSeek-VL layout ({', '.join(VL_TYPES)})")
        text = dict(d.pop("text_config", None) or {})
        text.setdefault("model_type", "llama")
        # the outer flag decides: transformers ties lm_head to the embedding from it
        text["tie_word_embeddings"] = d.pop("tie_word_embeddings", True)
        dtype = d.pop("torch_dtype", d.pop("dtype", None))
        if dtype is not None:
            text.setdefault("torch_dtype", dtype)
        high = d.pop("high_res_vision_config", None)
        if model_type == "deepseek_vl_hybrid" and high is None:
            raise ValueError(f"{where}: deepseek_vl_hybrid needs a high_res_vision_config block")
        for derived in ("architectures", "transformers_version", "auto_map"):
            d.pop(derived, None)
        return cls(text=ModelConfig.from_hf(text), vision=SiglipConfig.from_hf(d.pop("vision_config", None) or {}),
                   high_res=SamConfig.from_hf(high) if model_type == "deepseek_vl_hybrid" else None,
                   image_token_id=d.pop("image_token_id", 100015), extra=d)


# ----------------------------------------------------------------------------- fusion and aligners

class HighResProj(nn.Module):
    """SAM map [I, c, h, w] -> [I, 4c, g, g]: bilinear resize to 4g, two stride-2 3x3 convs (c -> 2c -> 4c)."""

    def __init__(self, channels: int, grid: int):
        super().__init__()
        self.grid = grid
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * channels, 4 * channels, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(4 * self.grid, 4 * self.grid), mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(x))


class HybridAligner(nn.Module):
    """[SAM tokens -> D/2 ; SigLIP tokens -> D/2] -> GELU -> Linear(D, D)."""

    def __init__(self, low_dim: int, high_dim: int, dim: int):
        super().__init__()
        self.vision_proj = nn.Linear(low_dim, dim // 2)
        self.high_res_vision_proj = nn.Linear(high_dim, dim // 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.high_res_vision_proj(high), self.vision_proj(low)], dim=-1)
        return self.proj(F.gelu(x))


class Aligner(nn.Module):
    """SigLIP tokens -> Linear -> GELU -> Linear -> D (deepseek_vl)."""

    def __init__(self, low_dim: int, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(low_dim, dim)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, low: torch.Tensor, high=None) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(low)))


class VisionParts(nn.Module):
    """Everything between pixels and the language model's embedding space (``model.*`` keys)."""

    def __init__(self, cfg: VLConfig):
        super().__init__()
        self.config = cfg
        D = cfg.text.hidden_size
        self.vision_model = SiglipVisionModel(cfg.vision)
        if cfg.high_res is None:
            self.aligner = Aligner(cfg.vision.hidden_size, D)
            return
        c = cfg.high_res.output_channels
        self.high_res_vision_model = SamVisionModel(cfg.high_res)
        self.high_res_vision_neck = Neck(cfg.high_res.hidden_size, c)
        self.high_res_vision_proj = HighResProj(c, cfg.vision.grid)
        self.high_res_vision_alpha = nn.Parameter(torch.zeros(1))
        self.aligner = HybridAligner(cfg.vision.hidden_size, 4 * c, D)

    def encode_high_res(self, pixels: torch.Tensor) -> torch.Tensor:
        """[I, 3, S_hi, S_hi] -> [I, N, 4c]: SAM's neck output + alpha * the early global layer's, projected."""
        last, per_layer = self.high_res_vision_model(pixels)
        early = self.high_res_vision_neck(per_layer[self.config.high_res.global_attn_indexes[0]])
        fused = self.high_res_vision_proj(last) + self.high_res_vision_proj(early) * self.high_res_vision_alpha
        return fused.flatten(2).transpose(1, 2)

    def encode_images(self, pixels: torch.Tensor, high_res_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocessed views (``vision.image``) -> image tokens [I, N, D] in the language model's space."""
        low = self.vision_model(pixels)
        if self.config.high_res is None:
            return self.aligner(low)
        if high_res_pixels is None:
            raise ValueError("deepseek_vl_hybrid needs the 1024 px view (high_res_pixels) beside the 384 px one")
        return self.aligner(low, self.encode_high_res(high_res_pixels))


def place_images(embeds: torch.Tensor, input_ids: torch.Tensor, image_tokens: torch.Tensor,
                 image_token_id: int) -> torch.Tensor:
    """Put image tokens [I, N, D] at the image_token_id positions of embeds [B, T, D], in reading order."""
    slots = input_ids == image_token_id
    n_slots, n_tokens = int(slots.sum()), image_tokens.shape[0] * image_tokens.shape[1]
    if n_slots != n_tokens:
        raise ValueError(f"the prompt has {n_slots} image positions but the images give {n_tokens} tokens "
                         f"({image_tokens.shape[0]} images x {image_tokens.shape[1]})")
    return embeds.masked_scatter(slots.unsqueeze(-1), image_tokens.to(embeds.dtype))


class VLModel(nn.Module):
    """``vl(input_ids, pixels, high_res_pixels)`` -> logits [B, T, vocab]; ``language`` is the
    plain nanoseek Transformer the engine drives (give it ``embed(...)`` as inputs_embeds)."""

    def __init__(self, cfg: VLConfig):
        super().__init__()
        self.config = cfg
        self.model = VisionParts(cfg)
        self.language = Transformer(cfg.text)

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
              high_res_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the images' tokens at the <image_placeholder> positions."""
        h = self.language.model.embed_tokens(input_ids)
        if pixels is None or pixels.shape[0] == 0:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("the prompt has <image_placeholder> positions but no images were given")
            return h
        return place_images(h, input_ids, self.model.encode_images(pixels, high_res_pixels), self.config.image_token_id)

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
                high_res_pixels: torch.Tensor | None = None, **kw) -> torch.Tensor:
        return self.language(input_ids, inputs_embeds=self.embed(input_ids, pixels, high_res_pixels), **kw)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02):
        """The language model's own init; vision weights N(0, std), norms one, biases zero."""
        self.language.reset_parameters(generator)
        for name, p in self.model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif not name.endswith("alpha"):
                p.normal_(0.0, std, generator=generator)


# ----------------------------------------------------------------------------- presets

SIGLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=384, patch_size=16)
SAM_B = dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12, image_size=1024,
             patch_size=16, mlp_dim=3072, window_size=14, global_attn_indexes=[2, 5, 8, 11])
# The published shapes (read from DeepSeek-VL's configs): 1.3B sees through SigLIP-L alone, 7B through
# the hybrid; both language models are DeepSeek-LLM's Llama layout with a 16K context.
VL_PRESETS = {
    "deepseek-vl-1.3b": lambda: VLConfig(
        text=ModelConfig.family("llama", vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                max_position_embeddings=16384, bos_token_id=100000, eos_token_id=100001),
        vision=SiglipConfig(**SIGLIP_L)),
    "deepseek-vl-7b": lambda: VLConfig(
        text=ModelConfig.preset("deepseek-llm-7b").replace(max_position_embeddings=16384),
        vision=SiglipConfig(**SIGLIP_L), high_res=SamConfig(**SAM_B)),
}


def vl_preset(name: str) -> VLConfig:
    if name not in VL_PRESETS:
        raise ValueError(f"unknown VL preset {name!r}; choose one of {sorted(VL_PRESETS)}")
    return VL_PRESETS[name]()
