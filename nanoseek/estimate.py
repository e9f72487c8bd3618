"""What hardware does a DeepSeek model need? Parameters, weight, KV-cache and training memory,
answered from its config alone (command: cli/estimate.py).

    print(report(ModelConfig.preset("deepseek-v3"), context=32768, batch=1))
    estimate(ModelConfig.preset("deepseek-v3")).kv_cache_bytes_per_token

The model is built on the meta device (no memory is allocated), so even DeepSeek-V3's 671B
parameters are counted in a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .model import Transformer

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass
class Estimate:
    total_params: int  # every parameter, MTP module included
    total_params_no_mtp: int
    active_params: int  # per token: shared parts + K of E routed experts (main model)
    mtp_params: int
    mtp_stored_copies: int  # DeepSeek-V3 stores the MTP module's shared embedding and head again
    kv_cache_bytes_per_token: int  # latent cache, main model layers, at kv_dtype
    mha_cache_bytes_per_token: int  # what per-head K and V caching of the same model would take
    kv_dtype_bytes: int

    def weight_bytes(self, dtype: str) -> float:
        return self.total_params * BYTES_PER_PARAM[dtype]

    def training_bytes(self, param_bytes: int = 4) -> int:
        """AdamW, mixed precision: fp32 weights + fp32 grads + two fp32 moments (16 B/param)."""
        return self.total_params * (param_bytes + 4 + 8)


def estimate(cfg: ModelConfig, kv_dtype_bytes: int = 2) -> Estimate:
    with torch.device("meta"):
        model = Transformer(cfg)
    total = model.num_params()
    no_mtp = model.num_params(include_mtp=False)
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return Estimate(
        total_params=total, total_params_no_mtp=no_mtp,
        active_params=model.num_params(active=True, include_mtp=False),
        mtp_params=total - no_mtp,
        mtp_stored_copies=2 * cfg.vocab_size * cfg.hidden_size * cfg.num_nextn_predict_layers,
        kv_cache_bytes_per_token=cfg.cache_bytes_per_token(kv_dtype_bytes),
        mha_cache_bytes_per_token=mha * cfg.num_hidden_layers * kv_dtype_bytes,
        kv_dtype_bytes=kv_dtype_bytes,
    )


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return f"{n:,.1f} {prefix}{unit}" if prefix else f"{n:,.0f} {unit}"
        n /= 1024
    return f"{n:.1f}"


def report(cfg: ModelConfig, context: int, batch: int) -> str:
    e = estimate(cfg)
    lines = [
        f"parameters: {e.total_params / 1e9:,.2f}B total ({e.total_params_no_mtp / 1e9:,.2f}B main model + "
        f"{e.mtp_params / 1e9:,.2f}B MTP; {(e.total_params + e.mtp_stored_copies) / 1e9:,.2f}B as DeepSeek "
        "stores it, with the MTP layer's copies of embedding and head)",
        f"active per token: {e.active_params / 1e9:,.2f}B",
        "weights: " + ", ".join(f"{k} {_human(e.weight_bytes(k))}" for k in BYTES_PER_PARAM),
        f"KV cache (MLA latent, bf16): {e.kv_cache_bytes_per_token:,} bytes/token; "
        f"{_human(e.kv_cache_bytes_per_token * context * batch)} for {batch} x {context:,} tokens "
        f"(per-head K/V caching would take {e.mha_cache_bytes_per_token:,} bytes/token, "
        f"{e.mha_cache_bytes_per_token / e.kv_cache_bytes_per_token:.1f}x more)",
        f"training with AdamW (fp32 master weights, grads, 2 moments; activations extra): "
        f"{_human(e.training_bytes())}",
    ]
    return "\n".join(lines)
