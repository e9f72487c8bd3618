"""ModelConfig: one flat, documented description of a DeepSeek-V2/V3 model.

Field names are the keys of the Hugging Face ``config.json`` that DeepSeek publishes, so a
config reads the same here, in the paper and in the checkpoint. The nested RoPE/YaRN block
(``rope_scaling`` in published checkpoints, ``rope_parameters`` in newer transformers) is
flattened into ``rope_*`` fields named after its keys.

    cfg = ModelConfig.from_hf("path/to/DeepSeek-V2-Lite")      # or a dict
    cfg = ModelConfig.preset("tiny")                              # tests and the demo
    json.dump(cfg.to_hf(), open("config.json", "w"))              # transformers loads it
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"  # "deepseek_v2" | "deepseek_v3": sets the routing defaults

    # --- sizes
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384  # dense SwiGLU MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 4
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_bias: bool = False  # bias on q_a/kv_a/o projections (False in every DeepSeek release)

    # --- mla: multi-head latent attention (DeepSeek-V2 §2.1)
    num_attention_heads: int = 4
    q_lora_rank: int | None = 64  # d'_c: query compression rank; None = full-rank q_proj (V2-Lite)
    kv_lora_rank: int = 32  # d_c: the latent c_KV that is cached instead of keys and values
    qk_nope_head_dim: int = 32  # d_h: per-head query/key part without position
    qk_rope_head_dim: int = 16  # d_h^R: decoupled rotary part; one shared key per token
    v_head_dim: int = 32
    rope_interleave: bool = True  # rotary pairs are (x0,x1),(x2,x3)...: the checkpoints' layout

    # --- rope / yarn (DeepSeek-V2 appendix; YaRN, Peng et al. 2023)
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "yarn"
    rope_factor: float = 1.0  # s: context extension factor
    original_max_position_embeddings: int | None = None  # pretraining context of the YaRN model
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0  # >0: the softmax scale is multiplied by mscale(s, mscale_all_dim)^2

    # --- moe: DeepSeekMoE (fine-grained routed experts + shared experts)
    first_k_dense_replace: int = 1  # the first k layers use the dense MLP
    moe_layer_freq: int = 1  # after those, every n-th layer is MoE
    moe_intermediate_size: int = 64  # width of one routed (and one shared) expert
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2  # K_r: routed experts per token
    n_group: int = 2  # experts are split into groups for group-limited routing
    topk_group: int = 1  # M: groups a token may use
    scoring_func: str = "sigmoid"  # "softmax" (V2) | "sigmoid" (V3)
    topk_method: str = "noaux_tc"  # "greedy" | "group_limited_greedy" (V2) | "noaux_tc" (V3)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0

    # --- mtp: multi-token prediction (DeepSeek-V3 §2.2)
    num_nextn_predict_layers: int = 1

    # --- tokens
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None

    # --- bookkeeping carried through from config.json, not architecture
    torch_dtype: str | None = None
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other keys, written back by to_hf()

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        if self.model_type not in ("deepseek_v2", "deepseek_v3"):
            bad("model_type", "unknown model_type; expected 'deepseek_v2' or 'deepseek_v3'")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                     "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("qk_rope_head_dim", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
                     "first_k_dense_replace", "num_nextn_predict_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (rotary dimensions come in pairs)")
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")
        if self.scoring_func not in ("softmax", "sigmoid"):
            bad("scoring_func", "expected 'softmax' or 'sigmoid'")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            bad("topk_method", "expected 'greedy', 'group_limited_greedy' or 'noaux_tc'")
        if self.rope_type not in ("default", "yarn"):
            bad("rope_type", "expected 'default' or 'yarn'")
        if self.rope_type == "yarn" and self.rope_factor <= 0:
            bad("rope_factor", "must be positive")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be positive")
        if self.has_moe:
            if self.n_routed_experts < 1:
                bad("n_routed_experts", "an MoE layer needs at least one routed expert")
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be between 1 and n_group={self.n_group}")
            reachable = self.n_routed_experts
            if self.topk_method in ("group_limited_greedy", "noaux_tc"):
                reachable = self.topk_group * (self.n_routed_experts // self.n_group)
            if not 1 <= self.num_experts_per_tok <= reachable:
                bad("num_experts_per_tok", f"must be between 1 and the {reachable} experts the chosen groups hold")
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
                bad("n_group", "noaux_tc scores a group by its top-2 experts, so groups need >= 2 experts")

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers + self.num_nextn_predict_layers))

    def is_moe_layer(self, layer_id: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every `moe_layer_freq` layers."""
        return (self.n_routed_experts > 0 and layer_id >= self.first_k_dense_replace
                and layer_id % self.moe_layer_freq == 0)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def latent_cache_width(self) -> int:
        """Numbers MLA caches per layer and token: the latent c_KV and the rotary key k^R."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def cache_bytes_per_token(self, itemsize: int, layers: int | None = None) -> int:
        """Latent-cache bytes per token over `layers` (default: the main model's) at this element size."""
        return self.latent_cache_width * (self.num_hidden_layers if layers is None else layers) * itemsize

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times YaRN's mscale^2 when the context is extended."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Read a DeepSeek config.json (a directory, the file, or its dict), either rope spelling."""
        d, where = _read_config(source)
        model_type = d.pop("model_type", None)
        if model_type not in ("deepseek_v2", "deepseek_v3"):
            raise ValueError(f"{where}: model_type={model_type!r} is not a DeepSeek model "
                             "(expected 'deepseek_v2' or 'deepseek_v3')")
        kw: dict[str, Any] = dict(_MODEL_TYPE_DEFAULTS[model_type], model_type=model_type, **_rope_fields(d))
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")

        names = {f.name for f in fields(cls)} - {"extra", "model_type"}
        extra = {}
        nullable = {f.name for f in fields(cls) if "None" in str(f.type)}
        for key, value in d.items():
            if key in names and value is None and key not in nullable:
                continue  # e.g. "n_group": null in DeepSeek-V2 configs means "no groups"
            if key in names:
                kw[key] = value
            else:
                extra[key] = value  # architectures, auto_map, transformers_version, ...
        act = extra.pop("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act={act!r} is not supported (DeepSeek uses 'silu')")
        for derived in ("architectures", "auto_map"):  # to_hf() writes its own; never remote code
            extra.pop(derived, None)
        heads = extra.pop("num_key_value_heads", None)
        if heads is not None and heads != kw.get("num_attention_heads", heads):
            raise ValueError(f"{where}: num_key_value_heads={heads} differs from num_attention_heads; "
                             "MLA has one latent per token and needs them equal")
        kw["extra"] = extra
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """A config.json dict in the published DeepSeek spelling; transformers loads it."""
        d = dict(self.extra)
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        d["architectures"] = [arch]
        for f in fields(self):
            if f.name in ("extra", "rope_type", "rope_factor", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "original_max_position_embeddings", "quantization_config",
                          "torch_dtype"):
                continue
            d[f.name] = getattr(self, f.name)
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["rope_scaling"] = None
        if self.rope_type == "yarn":
            d["rope_scaling"] = {
                "type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings
                or self.max_position_embeddings,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
            }
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        return d


def _read_config(source: str | os.PathLike | dict) -> tuple[dict, str]:
    """A config.json's dict (from a directory, the file, or the dict itself) and where it came from."""
    if isinstance(source, dict):
        return dict(source), "config dict"
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return json.load(f), path
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _rope_fields(d: dict) -> dict:
    """Pop the RoPE/YaRN keys from a config dict, in either spelling (rope_theta + rope_scaling{type},
    or transformers' newer rope_parameters{rope_type}), as ModelConfig fields."""
    kw: dict[str, Any] = {}
    rope = dict(d.pop("rope_parameters", None) or {})
    rope.update(d.pop("rope_scaling", None) or {})
    theta = d.pop("rope_theta", None) or rope.get("rope_theta")
    if theta is not None:
        kw["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    kw["rope_type"] = rope_type
    if rope_type == "yarn":
        kw["rope_factor"] = float(rope.get("factor", 1.0))
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if rope.get(key) is not None:
                kw[key] = float(rope[key])
        kw["original_max_position_embeddings"] = rope.get(
            "original_max_position_embeddings", d.get("original_max_position_embeddings"))
    d.pop("original_max_position_embeddings", None)
    return kw


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·m·ln(s) + 1 for s > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# Routing defaults that a model_type implies when config.json leaves them out.
_MODEL_TYPE_DEFAULTS = {
    "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                        routed_scaling_factor=1.0, n_group=1, topk_group=1, num_nextn_predict_layers=0,
                        first_k_dense_replace=0, moe_layer_freq=1, n_shared_experts=2),
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_nextn_predict_layers=0),
}

PRESETS: dict[str, dict] = {
    # A forward pass in milliseconds on a CPU: MLA with q compression, 1 dense + 3 MoE layers,
    # 8 routed experts in 2 groups, sigmoid + noaux_tc routing, one MTP module.
    "tiny": dict(model_type="deepseek_v3", vocab_size=1024, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
                 moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 n_group=2, topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc",
                 norm_topk_prob=True, routed_scaling_factor=1.0, num_nextn_predict_layers=1,
                 max_position_embeddings=1024),
    # DeepSeek-V2-Lite (16B total, 2.4B active), from its published config.json.
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
                             intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, first_k_dense_replace=1, moe_intermediate_size=1408,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
                             topk_group=1, scoring_func="softmax", topk_method="greedy",
                             norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
                             max_position_embeddings=163840, rope_theta=10000.0, rope_type="yarn",
                             rope_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                             beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707, bos_token_id=100000,
                             eos_token_id=100001),
    # DeepSeek-V3 / R1 (671B total, 37B active, +14B MTP), from its published config.json.
    "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
                        intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, first_k_dense_replace=3, moe_intermediate_size=2048,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                        topk_group=4, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                        max_position_embeddings=163840, rope_theta=10000.0, rope_type="yarn",
                        rope_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, bos_token_id=0, eos_token_id=1),
}
