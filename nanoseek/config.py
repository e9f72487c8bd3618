"""ModelConfig: one flat, documented description of any DeepSeek model.

Seven families, told apart by config.json's ``model_type`` (``FAMILIES``):

    deepseek_v3, deepseek_v2  MLA + DeepSeekMoE (+ MTP): V3, R1, V2, V2-Lite
    deepseek_v32              V3 + DeepSeek Sparse Attention (a lightning indexer per layer): V3.2
    deepseek_v4               shared-KV attention over a window + compressed entries (CSA/HCA), mHC,
                              hash-routed and sqrtsoftplus MoE (``v4.py``): V4-Flash, V4-Pro
    deepseek                  multi-head attention + DeepSeekMoE: DeepSeekMoE-16B
    llama                     grouped-query attention, dense: DeepSeek-LLM, DeepSeek-Coder, R1-Distill-Llama
    qwen2                     grouped-query attention with q/k/v biases, dense: R1-Distill-Qwen

Field names are the keys of the families' Hugging Face ``config.json``, so a config reads the
same here, in the paper and in the checkpoint; a family simply leaves the other families' fields
alone (and ``to_hf`` writes only its own). The nested RoPE block (``rope_scaling`` in published
checkpoints, ``rope_parameters`` in newer transformers) is flattened into fields named after its keys.

    cfg = ModelConfig.from_hf("path/to/DeepSeek-V2-Lite")      # or a dict
    cfg = ModelConfig.preset("r1-distill-qwen-1.5b")              # tiny, and every published shape
    cfg = ModelConfig.family("qwen2", hidden_size=256, ...)       # the family's defaults + these
    cfg = ModelConfig.from_spec("qwen2:hidden=256,layers=4", vocab_size=1024)   # a student's shape
    json.dump(cfg.to_hf(), open("config.json", "w"))              # transformers loads it
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .config_json import read_config, rope_fields, v4_fields
from .presets import PRESETS


@dataclass(frozen=True)
class Family:
    """What a config.json ``model_type`` builds and how its checkpoints are spelled."""
    attention: str  # "mla" | "gqa": the class attention.ATTENTION builds
    architecture: str  # config.json "architectures"
    moe: bool  # its layers may be DeepSeekMoE (else every FFN is the dense MLP)
    qkv_bias: bool  # biases on q/k/v whatever attention_bias says (Qwen2)
    keys: tuple[str, ...]  # GQA families: the fields to_hf writes besides model_type, RoPE, dtype (MLA: all)
    defaults: dict  # field values the family implies when config.json leaves them out
    indexer: bool = False  # MLA with DeepSeek-V3.2's lightning indexer and top-k selection (indexer.py)
    # "mla" | "gqa" | "v4": attention as above; "v4" builds the whole model from v4.py


_GQA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
             "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
_MOE_KEYS = ("moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
             "first_k_dense_replace", "moe_layer_freq", "scoring_func", "norm_topk_prob")
_DENSE = dict(n_routed_experts=0, n_shared_experts=0, num_nextn_predict_layers=0, first_k_dense_replace=0,
              rope_interleave=False)

FAMILIES = {
    "deepseek_v3": Family("mla", "DeepseekV3ForCausalLM", moe=True, qkv_bias=False, keys=(), defaults=dict(
        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
        num_nextn_predict_layers=0)),
    "deepseek_v32": Family("mla", "DeepseekV32ForCausalLM", moe=True, qkv_bias=False, keys=(), indexer=True,
                           defaults=dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                                         routed_scaling_factor=2.5, num_nextn_predict_layers=0)),
    "deepseek_v2": Family("mla", "DeepseekV2ForCausalLM", moe=True, qkv_bias=False, keys=(), defaults=dict(
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1,
        topk_group=1, num_nextn_predict_layers=0, first_k_dense_replace=0, moe_layer_freq=1, n_shared_experts=2)),
    "deepseek": Family("gqa", "DeepseekForCausalLM", moe=True, qkv_bias=False,
                       keys=_GQA_KEYS + ("attention_bias",) + _MOE_KEYS, defaults=dict(
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1,
        topk_group=1, num_nextn_predict_layers=0, first_k_dense_replace=0, moe_layer_freq=1, n_shared_experts=0,
        rope_interleave=False)),
    "llama": Family("gqa", "LlamaForCausalLM", moe=False, qkv_bias=False,
                    keys=_GQA_KEYS + ("attention_bias", "head_dim"), defaults=dict(_DENSE)),
    "qwen2": Family("gqa", "Qwen2ForCausalLM", moe=False, qkv_bias=True, keys=_GQA_KEYS + ("head_dim",),
                    defaults=dict(_DENSE)),
    "deepseek_v4": Family("v4", "DeepseekV4ForCausalLM", moe=True, qkv_bias=False, keys=(), defaults=dict(
        scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5, n_group=1,
        topk_group=1, first_k_dense_replace=0, moe_layer_freq=1, num_key_value_heads=1, rope_interleave=True,
        num_nextn_predict_layers=1)),
}
# The published DeepSeekMoE-16B config.json loads its classes from the checkpoint's own code.
_DEEPSEEK_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                      "AutoModel": "modeling_deepseek.DeepseekModel",
                      "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"  # a key of FAMILIES: picks attention, FFN, key spelling and defaults

    # --- sizes
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384  # dense SwiGLU MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 4
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_bias: bool = False  # MLA: bias on q_a/kv_a/o; GQA: on q/k/v/o (False in every DeepSeek release)
    num_attention_heads: int = 4

    # --- gqa: grouped-query attention (Llama, Qwen2, DeepSeek-LLM/Coder/MoE-16B)
    num_key_value_heads: int | None = None  # G key/value heads shared by H/G query heads each; None = H
    head_dim: int | None = None  # per-head size; None = hidden_size / num_attention_heads

    # --- mla: multi-head latent attention (DeepSeek-V2 §2.1)
    q_lora_rank: int | None = 64  # d'_c: query compression rank; None = full-rank q_proj (V2-Lite)
    kv_lora_rank: int = 32  # d_c: the latent c_KV that is cached instead of keys and values
    qk_nope_head_dim: int = 32  # d_h: per-head query/key part without position
    qk_rope_head_dim: int = 16  # d_h^R: decoupled rotary part; one shared key per token
    v_head_dim: int = 32
    rope_interleave: bool = True  # MLA's rotary pairs are (x0,x1),(x2,x3)...: its checkpoints' layout

    # --- dsa: DeepSeek Sparse Attention (V3.2 §2.1), deepseek_v32 only
    index_topk: int = 2048  # k: earlier tokens each query attends to, chosen by the lightning indexer
    index_head_dim: int = 128  # d^I: indexer query/key size (its first qk_rope_head_dim dims are rotated)
    index_n_heads: int = 64  # H^I: indexer heads

    # --- v4: DeepSeek-V4 (v4.py); also uses q_lora_rank, head_dim, qk_rope_head_dim and the index_* fields
    compress_ratios: list[int] | None = None  # per layer, main then MTP: 0 window only, 4 CSA, 128 HCA (m, m')
    window_size: int = 128  # n_win: recent tokens every V4 attention layer sees (config.json "sliding_window")
    compress_rope_theta: float = 160000.0  # RoPE base of CSA/HCA layers; rope_type/rope_factor (YaRN) apply there
    o_groups: int = 8  # g: head groups of the grouped output projection
    o_lora_rank: int = 1024  # d_g: each group's intermediate size
    hc_mult: int = 4  # n_hc: residual streams of the manifold-constrained hyper-connections (mHC)
    hc_sinkhorn_iters: int = 20  # t_max: Sinkhorn-Knopp iterations of the residual mixing matrix
    hc_eps: float = 1e-6
    num_hash_layers: int = 3  # the first layers route each token to experts tid2eid[token] (hash MoE)
    swiglu_limit: float | None = None  # clip expert gate (above) and up (both sides) pre-activations (V4: 10)

    # --- rope and its context extensions (layers.py: one function per rope_type)
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" (DeepSeek-Coder) | "llama3" (R1-Distill-Llama) | "yarn"
    rope_factor: float = 1.0  # s: context extension factor
    original_max_position_embeddings: int | None = None  # pretraining context (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3: wavelengths beyond orig/low_freq_factor are divided by s
    high_freq_factor: float = 4.0  # llama3: wavelengths below orig/high_freq_factor are kept
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

        if self.model_type not in FAMILIES:
            bad("model_type", f"unknown model_type; expected one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("n_routed_experts", "n_shared_experts", "moe_intermediate_size",
                     "first_k_dense_replace", "num_nextn_predict_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if self.attention == "mla":
            self._validate_mla(bad)
        elif self.attention == "v4":
            self._validate_v4(bad)
        else:
            self._validate_gqa(bad)
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")
        if self.scoring_func not in ("softmax", "sigmoid", "sqrtsoftplus"):
            bad("scoring_func", "expected 'softmax', 'sigmoid' or 'sqrtsoftplus'")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            bad("topk_method", "expected 'greedy', 'group_limited_greedy' or 'noaux_tc'")
        if self.rope_type not in ("default", "linear", "llama3", "yarn"):
            bad("rope_type", "expected 'default', 'linear', 'llama3' or 'yarn'")
        if self.rope_type != "default" and self.rope_factor <= 0:
            bad("rope_factor", "must be positive")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            bad("low_freq_factor", f"must be positive and below high_freq_factor={self.high_freq_factor}")
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

    def _validate_mla(self, bad) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if not isinstance(self.qk_rope_head_dim, int) or self.qk_rope_head_dim < 0 or self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be a non-negative even integer (rotary dimensions come in pairs)")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or null")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            bad("num_key_value_heads", "MLA has one latent per token and needs it equal to num_attention_heads")
        if self.has_indexer:
            for name, low in (("index_topk", 1), ("index_n_heads", 1), ("index_head_dim", self.qk_rope_head_dim)):
                if not isinstance(getattr(self, name), int) or getattr(self, name) < max(low, 1):
                    bad(name, f"must be an integer >= {max(low, 1)}")
            if self.q_lora_rank is None:
                bad("q_lora_rank", "the lightning indexer reads the compressed query: it must be set")

    def _validate_v4(self, bad) -> None:
        n = self.num_hidden_layers + self.num_nextn_predict_layers
        ratios = self.compress_ratios
        if not isinstance(ratios, list) or len(ratios) < self.num_hidden_layers \
                or any(r not in (0, 4, 128) and not (isinstance(r, int) and r > 1) for r in ratios):
            bad("compress_ratios", f"needs one entry per layer ({n}: main then MTP), each 0 (window only) "
                                   "or a compression rate > 1 (4: CSA, 128: HCA)")
        if self.num_key_value_heads not in (None, 1):
            bad("num_key_value_heads", "V4 attention has one shared key/value head")
        for name in ("head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "window_size", "hc_mult",
                     "hc_sinkhorn_iters", "index_topk", "index_n_heads", "index_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if self.num_attention_heads % self.o_groups:
            bad("o_groups", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.qk_rope_head_dim % 2 or not 0 < self.qk_rope_head_dim <= min(self.head_dim, self.index_head_dim):
            bad("qk_rope_head_dim", "must be even and at most head_dim and index_head_dim")
        if not 0 <= self.num_hash_layers <= n:
            bad("num_hash_layers", f"must be between 0 and the {n} layers")

    def compress_ratio(self, layer_id: int) -> int:
        """V4: layer `layer_id`'s compression rate (0: sliding window only; MTP layers past the list: 0)."""
        ratios = self.compress_ratios or []
        return ratios[layer_id] if layer_id < len(ratios) else 0

    def _validate_gqa(self, bad) -> None:
        G = self.kv_heads
        if not isinstance(G, int) or G <= 0 or self.num_attention_heads % G:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            bad("head_dim", f"must be given when num_attention_heads does not divide hidden_size={self.hidden_size}")
        if not isinstance(self.attention_head_dim, int) or self.attention_head_dim <= 0 or self.attention_head_dim % 2:
            bad("head_dim", "must be a positive even integer (rotary dimensions come in pairs)")
        if not FAMILIES[self.model_type].moe and self.n_routed_experts:
            bad("n_routed_experts", f"{self.model_type} models are dense (build one with "
                                    f"ModelConfig.family({self.model_type!r}, ...) for the family's defaults)")
        if self.num_nextn_predict_layers:
            bad("num_nextn_predict_layers", f"{self.model_type} models have no MTP module")

    # ------------------------------------------------------------------ derived
    @property
    def attention(self) -> str:
        """"mla" or "gqa": the attention class (attention.ATTENTION) of this model_type."""
        return FAMILIES[self.model_type].attention

    @property
    def has_indexer(self) -> bool:
        """DeepSeek Sparse Attention: every MLA layer has a lightning indexer (deepseek_v32)."""
        return FAMILIES[self.model_type].indexer

    @property
    def qkv_bias(self) -> bool:
        """Biases on the GQA q/k/v projections: Qwen2's always, Llama's with attention_bias."""
        return FAMILIES[self.model_type].qkv_bias or self.attention_bias

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def attention_head_dim(self) -> int:
        """GQA's per-head size: head_dim, or hidden_size / num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions the rotary embedding turns: MLA's decoupled k^R and V4's rotated tail, or GQA's whole head."""
        return self.attention_head_dim if self.attention == "gqa" else self.qk_rope_head_dim

    @property
    def head_dims(self) -> tuple[int, int]:
        """(query/key, value) size of one attention head: MLA's (dn + dr, dv), GQA's (dh, dh)."""
        if self.attention == "mla":
            return self.qk_head_dim, self.v_head_dim
        return self.attention_head_dim, self.attention_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers + self.num_nextn_predict_layers))

    def is_moe_layer(self, layer_id: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every `moe_layer_freq` layers."""
        return (FAMILIES[self.model_type].moe and self.n_routed_experts > 0 and layer_id >= self.first_k_dense_replace
                and layer_id % self.moe_layer_freq == 0)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def cache_width(self) -> int:
        """Numbers the KV cache holds per layer and token: MLA's latent c_KV and rotary key k^R, or
        GQA's key and value of every key/value head. With DSA the indexer's key k^I rides along:
        [c_KV ; k^R ; k^I], so every cache layout keeps the two in step. V4 keeps no per-token
        entry of this kind: its cache (``inference/compressed.py``) reports its own bytes."""
        if self.attention == "v4":
            return 0
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.has_indexer else 0)
        return 2 * self.kv_heads * self.attention_head_dim

    def cache_bytes_per_token(self, itemsize: int, layers: int | None = None) -> int:
        """KV-cache bytes per token over `layers` (default: the main model's) at this element size.
        V4: what one more token adds on average, sum over compressed layers of entry width / m (its
        window and pending projections are a fixed part per sequence: ``inference.compressed.fixed_bytes``)."""
        n = self.num_hidden_layers if layers is None else layers
        if self.attention == "v4":
            return round(sum(sum(self.v4_entry_widths(m)) * itemsize / m for m in map(self.compress_ratio, range(n)) if m))
        return self.cache_width * n * itemsize

    def v4_entry_widths(self, m: int) -> tuple[int, ...]:
        """V4: the parts of one compressed entry at rate m: CSA's key and its indexer key, HCA's key."""
        return (self.head_dim, self.index_head_dim) if m == 4 else (self.head_dim,)

    @property
    def softmax_scale(self) -> float:
        """GQA: 1/sqrt(head_dim). MLA: 1/sqrt(d_h + d_h^R), times YaRN's mscale^2 when the context is
        extended (DeepSeek-V2's rule; Llama-family YaRN scales only cos/sin)."""
        if self.attention == "gqa":
            return self.attention_head_dim ** -0.5
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
        return cls.family(**PRESETS[name])

    @classmethod
    def family(cls, model_type: str, **fields_) -> "ModelConfig":
        """A config of `model_type` with the family's defaults (FAMILIES) under the given fields."""
        if model_type not in FAMILIES:
            raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(FAMILIES)}")
        return cls(**{**FAMILIES[model_type].defaults, "model_type": model_type, **fields_})

    @classmethod
    def from_spec(cls, spec: str, **base) -> "ModelConfig":
        """A config from a short spec: a family or a preset, then field=value pairs (full field names
        or SPEC_ALIASES) over `base` (say the teacher's vocab_size and token ids), e.g.

            qwen2:hidden=256,layers=4,heads=4,kv_heads=2,inter=768     # a family's defaults + these
            tiny-qwen2:layers=2                                          # a preset + these

        How a distillation student's shape is written (``nanoseek distill --student qwen2:...``)."""
        head, _, rest = spec.partition(":")
        head = head.strip()
        kw = dict(PRESETS[head]) if head in PRESETS else dict(model_type=head)
        kw.update(base)
        names = {f.name for f in fields(cls)} - {"extra", "model_type"}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = (x.strip() for x in item.partition("="))
            key = SPEC_ALIASES.get(key, key)
            if not eq or key not in names:
                raise ValueError(f"{spec!r}: {item!r} is not field=value for a ModelConfig field "
                                 f"(short names: {', '.join(SPEC_ALIASES)})")
            try:
                kw[key] = json.loads(value)
            except json.JSONDecodeError:
                kw[key] = value  # a bare string: scoring_func=softmax
        return cls.family(**kw)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Read any family's config.json (a directory, the file, or its dict), either rope spelling."""
        d, where = read_config(source)
        model_type = d.pop("model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(f"{where}: model_type={model_type!r} is not a DeepSeek model family nanoseek "
                             f"builds (expected one of {', '.join(FAMILIES)})")
        try:
            v4 = v4_fields(d) if model_type == "deepseek_v4" else {}
            kw: dict[str, Any] = dict(FAMILIES[model_type].defaults, model_type=model_type, **v4, **rope_fields(d))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        if FAMILIES[model_type].attention == "mla":  # written for transformers; MLA has no key/value heads
            heads = d.pop("num_key_value_heads", None)
            if heads is not None and heads != d.get("num_attention_heads", heads):
                raise ValueError(f"{where}: num_key_value_heads={heads} differs from num_attention_heads; "
                                 "MLA has one latent per token and needs them equal")

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
        for key, supported, why in _UNSUPPORTED:
            if extra.get(key, supported) != supported:
                raise ValueError(f"{where}: {key}={extra[key]!r} is not supported ({why})")
        extra.pop("hidden_act", None)
        for derived in ("architectures", "auto_map"):  # to_hf() writes its own; never remote code
            extra.pop(derived, None)
        kw["extra"] = extra
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """A config.json dict in the family's published spelling; transformers loads it (DeepSeekMoE-16B:
        the published layout, whose classes come with the checkpoint's own code)."""
        family = FAMILIES[self.model_type]
        d = dict(self.extra)
        d["architectures"] = [family.architecture]
        d["model_type"] = self.model_type
        if family.attention == "v4":
            d.update(self._v4_hf())
        elif family.attention == "mla":
            for f in fields(self):
                if f.name not in _NOT_WRITTEN and (family.indexer or not f.name.startswith("index_")):
                    d[f.name] = getattr(self, f.name)
            d["num_key_value_heads"] = self.num_attention_heads
        else:
            d.update({key: getattr(self, key) for key in family.keys if getattr(self, key) is not None
                      or key.endswith("token_id")})
            d["num_key_value_heads"] = self.kv_heads
        if self.model_type == "deepseek":
            d["auto_map"] = dict(_DEEPSEEK_AUTO_MAP)
        elif family.attention == "v4":
            d["sliding_window"] = d.pop("window_size")
        d["hidden_act"] = "silu"
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = self._rope_scaling()
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        return d

    def _v4_hf(self) -> dict:
        """A V4 config.json's own keys in DeepSeek's published spelling (compress_ratios, num_hash_layers,
        qk_rope_head_dim), plus transformers' layer_types/compress_rates when an HCA rate is not the
        published 128 (transformers reads compress_ratios entries as 0, 4 or 128 only)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _V4_KEYS}
        d["num_key_value_heads"] = 1
        hca = sorted({r for r in self.compress_ratios if r not in (0, 4)})
        if hca and hca != [128]:
            if len(hca) > 1:
                raise ValueError(f"compress_ratios: HCA rates {hca} differ; transformers takes one per layer type")
            kinds = {0: "sliding_attention", 4: "compressed_sparse_attention"}
            d["layer_types"] = [kinds.get(r, "heavily_compressed_attention")
                                for r in self.compress_ratios[:self.num_hidden_layers]]
            d["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0]}
        return d

    def _rope_scaling(self) -> dict | None:
        """config.json's rope_scaling block: DeepSeek's spelling ("type") for MLA, "rope_type" elsewhere."""
        if self.rope_type == "default":
            return None
        spelling = "type" if self.attention == "mla" else "rope_type"
        block = {spelling: self.rope_type, "factor": self.rope_factor}
        orig = self.original_max_position_embeddings or self.max_position_embeddings
        if self.rope_type == "llama3":
            block.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                         original_max_position_embeddings=orig)
        elif self.rope_type == "yarn":
            block.update(original_max_position_embeddings=orig, beta_fast=self.beta_fast, beta_slow=self.beta_slow,
                         mscale=self.mscale, mscale_all_dim=self.mscale_all_dim)
        return block


# Fields to_hf leaves out of an MLA config.json: RoPE goes in its block, the rest is bookkeeping or
# another family's.
_NOT_WRITTEN = {"extra", "rope_type", "rope_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "quantization_config",
                "torch_dtype", "num_key_value_heads", "head_dim"}

# The fields a V4 config.json holds (window_size is written as "sliding_window").
_V4_KEYS = {"vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "n_routed_experts",
            "n_shared_experts", "num_experts_per_tok", "scoring_func", "topk_method", "norm_topk_prob",
            "routed_scaling_factor", "max_position_embeddings", "compress_rope_theta", "compress_ratios",
            "window_size", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "num_hash_layers", "swiglu_limit",
            "index_n_heads", "index_head_dim", "index_topk", "num_nextn_predict_layers", "rms_norm_eps",
            "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id"}

# config.json keys whose other values nanoseek does not build: (key, the value it builds, why).
_UNSUPPORTED = [
    ("hidden_act", "silu", "every DeepSeek release uses 'silu'"),
    ("mlp_bias", False, "no DeepSeek release has MLP biases"),
    ("use_sliding_window", False, "R1-Distill-Qwen ships it off; sliding-window attention is not built"),
    ("pretraining_tp", 1, "only the unsplit projections are built"),
]

def is_spec(text: str) -> bool:
    """Whether `text` is a ``from_spec`` spec (a family or preset name, optionally ``:field=value,...``)."""
    return text.partition(":")[0].strip() in FAMILIES.keys() | PRESETS.keys()


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·m·ln(s) + 1 for s > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# Short names from_spec accepts for the fields a student's shape is written with.
SPEC_ALIASES = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "inter": "intermediate_size", "vocab": "vocab_size",
                "tie": "tie_word_embeddings", "context": "max_position_embeddings"}
