"""What hardware does a DeepSeek model need? Parameters, weight, KV-cache and training memory,
answered from its config alone (command: cli/estimate.py), for every family: MLA models cache a
latent, grouped-query ones the keys and values of their key/value heads.

    print(report(ModelConfig.preset("deepseek-v3"), context=32768, batch=1))
    estimate(ModelConfig.preset("r1-distill-qwen-7b")).kv_cache_bytes_per_token
    print(parallel_report(ModelConfig.preset("deepseek-v2-lite"), world=8, ep=8, batch=1, seq_len=4096))

The model is built on the meta device (no memory is allocated), so even DeepSeek-V3's 671B
parameters are counted in a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .models import build_model

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass
class Estimate:
    total_params: int  # every parameter, MTP module included
    total_params_no_mtp: int
    active_params: int  # per token: shared parts + K of E routed experts (main model)
    mtp_params: int
    mtp_stored_copies: int  # DeepSeek-V3 stores the MTP module's shared embedding and head again
    kv_cache_bytes_per_token: int  # what the engine caches (MLA latent or GQA K/V), main layers, at kv_dtype
    index_cache_bytes_per_token: int  # of which DSA's indexer keys k^I (deepseek_v32; else 0)
    mha_cache_bytes_per_token: int  # what caching K and V of every query head would take
    kv_dtype_bytes: int
    expert_params: int = 0  # the routed experts' share of total_params (what expert parallelism splits)

    def weight_bytes(self, dtype: str) -> float:
        return self.total_params * BYTES_PER_PARAM[dtype]

    def training_bytes(self, param_bytes: int = 4) -> int:
        """AdamW, mixed precision: fp32 weights + fp32 grads + two fp32 moments (16 B/param)."""
        return self.total_params * (param_bytes + 4 + 8)


def estimate(cfg: ModelConfig, kv_dtype_bytes: int = 2) -> Estimate:
    with torch.device("meta"):
        model = build_model(cfg)
    total = model.num_params()
    no_mtp = model.num_params(include_mtp=False)
    mha = cfg.num_attention_heads * sum(cfg.head_dims)
    return Estimate(
        total_params=total, total_params_no_mtp=no_mtp,
        active_params=model.num_params(active=True, include_mtp=False),
        mtp_params=total - no_mtp,
        mtp_stored_copies=(2 * cfg.vocab_size * cfg.hidden_size * cfg.num_nextn_predict_layers
                           if cfg.attention != "v4" else 0),  # V4's MTP shares embedding and head unstored
        kv_cache_bytes_per_token=cfg.cache_bytes_per_token(kv_dtype_bytes),
        index_cache_bytes_per_token=(cfg.index_head_dim * cfg.num_hidden_layers * kv_dtype_bytes
                                     if cfg.has_indexer else 0),
        mha_cache_bytes_per_token=mha * cfg.num_hidden_layers * kv_dtype_bytes,
        kv_dtype_bytes=kv_dtype_bytes,
        expert_params=sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
    )


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return f"{n:,.1f} {prefix}{unit}" if prefix else f"{n:,.0f} {unit}"
        n /= 1024
    return f"{n:.1f}"


def cache_kind(cfg: ModelConfig) -> str:
    """What the KV cache holds, in words."""
    if cfg.attention == "v4":
        return "V4: CSA/HCA compressed entries, averaged; plus a window per sequence"
    if cfg.has_indexer:
        return "MLA latent + DSA indexer keys"
    if cfg.attention == "mla":
        return "MLA latent"
    if cfg.kv_heads == cfg.num_attention_heads:
        return f"K/V of all {cfg.kv_heads} heads"
    return f"GQA: K/V of {cfg.kv_heads} key/value heads"


def vl_report(cfg, context: int, batch: int) -> str:
    """``report`` for a DeepSeek-VL config (vision.VLConfig): the language model's figures, then
    the towers' parameters and what one image costs in prompt tokens and cache."""
    from .vision.vl import VisionParts
    with torch.device("meta"):
        parts = VisionParts(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    towers = {"SigLIP": parts.vision_model, "aligner": parts.aligner}
    if cfg.high_res is not None:
        towers["SAM-B (+ neck, projection)"] = [parts.high_res_vision_model, parts.high_res_vision_neck,
                                                parts.high_res_vision_proj]
    sizes = {k: sum(count(x) for x in v) if isinstance(v, list) else count(v) for k, v in towers.items()}
    text = estimate(cfg.text)
    n = cfg.num_image_tokens
    return "\n".join([
        f"{cfg.model_type}: {(text.total_params + sum(sizes.values())) / 1e9:,.2f}B parameters "
        f"({', '.join(f'{k} {v / 1e6:,.1f}M' for k, v in sizes.items())}; language model below)",
        f"one image: {n} prompt tokens, {_human(n * text.kv_cache_bytes_per_token)} of KV cache (bf16)",
        report(cfg.text, context, batch)])


def report(cfg: ModelConfig, context: int, batch: int) -> str:
    e = estimate(cfg)
    copies = (f"; {(e.total_params + e.mtp_stored_copies) / 1e9:,.2f}B as DeepSeek stores it, with the MTP "
              "layer's copies of embedding and head") if e.mtp_stored_copies else ""
    mtp = (f" ({e.total_params_no_mtp / 1e9:,.2f}B main model + {e.mtp_params / 1e9:,.2f}B MTP{copies})"
           if cfg.num_nextn_predict_layers else "")
    lines = [
        f"parameters: {e.total_params / 1e9:,.2f}B total{mtp}",
        f"active per token: {e.active_params / 1e9:,.2f}B",
        "weights: " + ", ".join(f"{k} {_human(e.weight_bytes(k))}" for k in BYTES_PER_PARAM),
        f"KV cache ({cache_kind(cfg)}, bf16): {e.kv_cache_bytes_per_token:,} bytes/token; "
        f"{_human(e.kv_cache_bytes_per_token * context * batch)} for {batch} x {context:,} tokens "
        f"(K/V of every query head would take {e.mha_cache_bytes_per_token:,} bytes/token, "
        f"{e.mha_cache_bytes_per_token / e.kv_cache_bytes_per_token:.1f}x as much)",
        f"training with AdamW (fp32 master weights, grads, 2 moments; activations extra): "
        f"{_human(e.training_bytes())}",
    ]
    if cfg.has_indexer:
        lines.insert(4, _dsa_line(cfg, e, context))
    if cfg.attention == "v4":
        lines.insert(4, _v4_line(cfg, context))
    return "\n".join(lines)


def v4_decode_cost(cfg: ModelConfig, context: int, itemsize: int = 2) -> tuple[float, float]:
    """(cache bytes read, attention FLOPs) of one V4 decode step at `context` tokens: every layer reads its
    window; HCA every entry; CSA the indexer keys of every entry and the k chosen entries. FLOPs count
    q·k and p·v over what is attended (and the indexer's scores); projections and experts are apart."""
    H, dh, W = cfg.num_attention_heads, cfg.head_dim, min(cfg.window_size, context)
    read = flops = 0.0
    for m in map(cfg.compress_ratio, range(cfg.num_hidden_layers)):
        n = context // m if m else 0
        attended = W + (min(cfg.index_topk, n) if m == 4 else n)
        read += attended * dh + (n * cfg.index_head_dim if m == 4 else 0)
        flops += 4 * H * dh * attended + (2 * cfg.index_n_heads * cfg.index_head_dim * n if m == 4 else 0)
    return read * itemsize, flops


def _v4_line(cfg: ModelConfig, context: int) -> str:
    from .inference.compressed import fixed_bytes
    mla = ModelConfig.preset("deepseek-v3")
    ctx = max(context, 1 << 20)
    read, flops = v4_decode_cost(cfg, ctx)
    dense = mla.cache_bytes_per_token(2) * ctx
    return (f"V4 cache: {_human(fixed_bytes(cfg, 2))} per sequence (windows, open compression windows) + the "
            f"entries above; at {ctx // 1024}k context a decode step reads {_human(read)} of cache and does "
            f"{flops / 1e9:,.1f} GFLOP of attention (DeepSeek-V3's MLA reads all {_human(dense)}: "
            f"{dense / read:,.0f}x as much)")


def _dsa_line(cfg: ModelConfig, e: Estimate, context: int) -> str:
    """DeepSeek Sparse Attention's split of the cache, and what one decode step reads of it."""
    latent = e.kv_cache_bytes_per_token - e.index_cache_bytes_per_token
    k = min(cfg.index_topk, context)
    read = (latent * k + e.index_cache_bytes_per_token * context) / (e.kv_cache_bytes_per_token * context)
    return (f"DSA: {latent:,} bytes/token of latent + {e.index_cache_bytes_per_token:,} of indexer keys; "
            f"at {context // 1024}k context a decode step reads the indexer keys of all {context:,} tokens and "
            f"the latents of only k={k:,} ({read:.1%} of the cache; dense MLA reads all of it)")


# ----------------------------------------------------------------------------- per-rank training memory

@dataclass
class RankMemory:
    """Bytes one rank holds while training (fp32 master weights, fp32 gradients, AdamW's two moments)."""

    layout: str
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def activation_bytes_per_token(cfg: ModelConfig, itemsize: int = 2, checkpointing: bool = False) -> float:
    """A first-order count of what backward keeps per token: per block, the norms' inputs and outputs,
    attention's queries, keys, values and output, and the FFN's inputs and intermediates (K routed
    experts + shared for MoE). With activation checkpointing only each block's input is kept (plus one
    block recomputed at a time). Softmax/flash buffers and the fused head's chunks are left out."""
    D = cfg.hidden_size
    qk, v = cfg.head_dims
    attn = cfg.num_attention_heads * (2 * qk + 2 * v)

    def ffn(i: int) -> int:
        if not cfg.is_moe_layer(i):
            return 3 * cfg.intermediate_size
        inter = cfg.moe_intermediate_size
        return cfg.num_experts_per_tok * (D + 3 * inter) + 3 * inter * (cfg.n_shared_experts or 0)

    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per_layer = [4 * D + attn + ffn(i) for i in range(layers)]
    if checkpointing:
        return itemsize * (layers * D + max(per_layer))
    return itemsize * sum(per_layer)


def rank_memory(cfg: ModelConfig, world: int, ep: int = 1, fsdp: bool = True, batch: int = 1, seq_len: int = 4096,
                checkpointing: bool = False, e: Estimate | None = None) -> RankMemory:
    """Per-rank memory of one layout: dense weights sharded over the world (FSDP) or replicated; routed
    experts split over ep ranks, and with FSDP sharded again over the world/ep that hold the same ones.
    batch: sequences per rank per micro-batch. FSDP's transient all-gather of one block is not counted."""
    e = e or estimate(cfg)
    dense, experts = e.total_params - e.expert_params, e.expert_params
    shard = world if fsdp else 1
    params = dense / shard + experts / (world if fsdp else ep)
    name = ("FSDP" if fsdp else "replicated") + (f" + EP {ep}" if ep > 1 else "")
    acts = activation_bytes_per_token(cfg, checkpointing=checkpointing) * batch * seq_len
    return RankMemory(name, weights=4 * params, grads=4 * params, optimizer=8 * params, activations=acts)


def parallel_report(cfg: ModelConfig, world: int, ep: int = 1, fsdp: bool | None = None, batch: int = 1,
                    seq_len: int = 4096, checkpointing: bool = False) -> str:
    """A table of per-rank memory for the layouts of `world` ranks (fsdp None: with and without FSDP)."""
    if world < 1 or ep < 1 or world % ep:
        raise ValueError(f"--ep={ep} must divide --world={world} (both >= 1)")
    if ep > 1 and (cfg.n_routed_experts or 1) % ep:
        raise ValueError(f"--ep={ep} must divide the model's {cfg.n_routed_experts} routed experts")
    layouts = [(f, p) for f in ((True, False) if fsdp is None else (fsdp,)) for p in sorted({1, ep})]
    e = estimate(cfg)
    rows = [rank_memory(cfg, 1, 1, False, batch, seq_len, checkpointing, e)]
    rows[0].layout = "one device"
    rows += [rank_memory(cfg, world, p, f, batch, seq_len, checkpointing, e) for f, p in layouts]
    head = (f"per-rank training memory, {world} ranks, AdamW fp32 (activations: bf16, {batch} x {seq_len:,} tokens"
            f"{', checkpointed' if checkpointing else ''}):")
    lines = [head, f"  {'layout':<22}{'weights':>12}{'grads':>12}{'optimizer':>12}{'activations':>13}{'total':>12}"]
    for r in rows:
        lines.append(f"  {r.layout:<22}" + "".join(f"{_human(b):>12}" for b in (r.weights, r.grads, r.optimizer))
                     + f"{_human(r.activations):>13}{_human(r.total):>12}")
    return "\n".join(lines)
