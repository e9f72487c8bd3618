"""Attention, chosen by the config: MLA (DeepSeek-V2/V3) or grouped-query attention (everything else).

    MLA  multi-head latent attention: caches one latent per token, attends expanded or absorbed
    GQA  grouped-query attention: Llama/Qwen2's, and multi-head attention when every query head has
         its own key/value head (DeepSeek-LLM-7B, DeepSeek-Coder-6.7B, DeepSeekMoE-16B)

Both take (x, cos, sin, mask, cache, absorb) and give the caller the same cache contract: one vector
per layer and token goes through ``cache.update(layer_id, vector)``, which returns every cached
vector of the row. For MLA that vector is [c_KV ; k^R]; for GQA it is [keys ; values] of every
key/value head, so one cache (slots or pages) serves both. ``ATTENTION[cfg.attention]`` is the
class a Block builds.

``Ragged`` lets one forward carry rows of different lengths (decode rows and a prefill chunk):
the token-wise layers see all tokens at once and only attention is split by part.

Shapes: B batch, T query tokens, S key tokens, D hidden, H query heads, G key/value heads,
dh head size; MLA: R kv_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .indexer import Indexer, chosen_mask, gather_chosen, record_for_loss
from .layers import Linear, RMSNorm, apply_rotary


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1).

    Keys and values are compressed into one latent c_KV = RMSNorm(W_DKV h) of R dims per
    token, plus a single rotary key k^R shared by all heads: this (R + dr) vector is all
    that a KV cache stores. Two ways to attend, same result:
      expanded  - up-project the latent to per-head keys/values (W_UK, W_UV in kv_b_proj)
                  and run SDPA; cheapest when many queries share the keys (training, prefill).
      absorbed  - fold W_UK into the query and W_UV after attention, so attention runs in the
                  latent space; cost per query grows with R x context, not H x dh x context (decode).
    With DeepSeek Sparse Attention (deepseek_v32, ``indexer.py``) a lightning indexer picks the
    index_topk keys each query attends to: a mask on either path, or (absorbed, few queries) a
    gather of just those latents. Its key rides in the cache after the latent.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.interleaved = cfg.rope_interleave
        self.softmax_scale = cfg.softmax_scale
        H, dqk = cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, H * dqk, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * dqk, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(H * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What a cache stores for x [B, T, D]: [c_KV ; rope(k^R)] as [B, T, R + dr]."""
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return torch.cat((self.kv_a_layernorm(c_kv), apply_rotary(k_pe, cos, sin, self.interleaved)), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache=None, absorb: bool = False) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D].

        mask: bool [B, 1, T, S], True = may attend; None = causal over x alone.
        cache: an object with ``update(layer_id, latent [B,T,R+dr]) -> [B,S,R+dr]`` holding the
        latents of earlier tokens (``inference.cache.LatentCache``); the returned S keys are attended.
        """
        B, T, _ = x.shape
        H, dn, dr = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q_a = None if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))  # c_Q [B, T, d'_c]
        q = self.q_proj(x) if q_a is None else self.q_b_proj(q_a)
        q_nope, q_pe = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)  # [B, T, H, dn], [B, T, H, dr]
        q_pe = apply_rotary(q_pe, cos, sin, self.interleaved)
        kv = self.latent(x, cos, sin)  # [B, T, R + dr]
        if self.indexer is not None:
            kv = torch.cat((kv, self.indexer.keys(x, cos, sin)), dim=-1)  # [B, T, R + dr + d^I]
        if cache is not None:
            kv = cache.update(self.layer_id, kv)  # [B, S, R + dr (+ d^I)]
        if self.indexer is not None:
            out = self._attend_sparse(x, q_a, cos, sin, q_nope, q_pe, kv, mask, absorb)
        elif absorb:
            out = self._attend_absorbed(q_nope, q_pe, kv, mask)
        else:
            out = self._attend_expanded(q_nope, q_pe, kv, mask)
        return self.o_proj(out.flatten(2))  # [B, T, H*dv] -> [B, T, D]

    def _attend_sparse(self, x, q_a, cos, sin, q_nope, q_pe, kv, mask, absorb):
        """DSA (V3.2 eq. 2): attend to the indexer's top-k keys of each query. kv holds [latent ; k^I]."""
        whole = kv
        kv, keys = kv.split([kv.shape[-1] - self.indexer.head_dim, self.indexer.head_dim], dim=-1)
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        idx, allowed = self.indexer.select(x, q_a, cos, sin, keys, mask)
        if self.indexer.stage == "warmup":
            idx = None  # dense attention while the indexer learns to imitate it (eq. 3)
        if idx is not None:
            allowed = chosen_mask(idx, allowed)[:, 0]
        if self.indexer.stage is not None and torch.is_grad_enabled():
            record_for_loss(self.indexer, self, x, q_a, cos, sin, keys, q_nope, q_pe, kv, allowed)
        if idx is not None and absorb and T * self.indexer.topk <= S:  # decoding: read only k latents per query
            rows, row_mask = gather_chosen(whole, idx, allowed, kv.shape[-1])
            out = self._attend_absorbed(q_nope.reshape(B * T, 1, H, -1), q_pe.reshape(B * T, 1, H, -1), rows, row_mask)
            return out.view(B, T, H, -1)
        attend = self._attend_absorbed if absorb else self._attend_expanded
        return attend(q_nope, q_pe, kv, allowed.unsqueeze(1))

    def _attend_expanded(self, q_nope, q_pe, kv, mask):
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, -1).split([self.qk_nope_head_dim, self.v_head_dim], -1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, H, T, dn+dr]
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)), dim=-1).transpose(1, 2)  # [B, H, S, dn+dr]
        v = v.transpose(1, 2)  # [B, H, S, dv]
        causal = mask is None and T > 1
        if mask is None and T > 1 and S != T:
            raise ValueError("a causal mask is needed when queries and keys differ in length")
        # Flash kernels want one head size for q, k and v; zero-padding v (dv < dn+dr in MLA) and
        # slicing the output is exact and, on CPU, ~3x faster than SDPA's unfused fallback.
        pad = q.shape[-1] - v.shape[-1]
        if pad > 0:
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        return o[..., :self.v_head_dim].transpose(1, 2)  # [B, T, H, dv]

    def _attend_absorbed(self, q_nope, q_pe, kv, mask):
        B, T, H, _ = q_nope.shape
        R = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, -1, R)  # [H, dn+dv, R]
        w_uk, w_uv = w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
        # W_UK folded into the query, one matmul per head over all B*T queries (a bmm: einsum's
        # equation handling costs more than the product itself at decode sizes)
        q_lat = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # [H, B*T, R]
        q_lat = q_lat.transpose(0, 1).view(B, T, H, R)
        q = torch.cat((q_lat, q_pe), dim=-1).flatten(1, 2)  # [B, T*H, R+dr]: every head is a query of one MQA
        scores = torch.bmm(q, kv.transpose(1, 2)).float() * self.softmax_scale  # [B, T*H, S]
        if mask is not None:
            scores = scores.view(B, T, H, -1).masked_fill(~mask.transpose(1, 2), float("-inf")).flatten(1, 2)
        elif T > 1:
            causal = torch.ones(T, kv.shape[1], dtype=torch.bool, device=kv.device).tril(kv.shape[1] - T)
            scores = scores.view(B, T, H, -1).masked_fill(~causal[None, :, None], float("-inf")).flatten(1, 2)
        p = scores.softmax(-1).to(kv.dtype)
        o_lat = torch.bmm(p, kv[..., :R])  # [B, T*H, R]: attention output, still in latent space
        o = torch.bmm(o_lat.view(B * T, H, R).transpose(0, 1), w_uv.transpose(1, 2))  # W_UV after: [H, B*T, dv]
        return o.transpose(0, 1).reshape(B, T, H, -1)  # [B, T, H, dv]


class GQA(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): H query heads share G key/value heads, query
    head h reading key/value head h // (H/G); G = H is multi-head attention. Rotary acts on the whole
    head in the half-split layout. q/k/v carry biases when the config says so (Qwen2 always,
    Llama when attention_bias), o_proj only with attention_bias.

    The cache holds [k_1..k_G ; v_1..v_G] per token: 2·G·dh numbers per layer (``cache_width``),
    written by the same ``cache.update`` as MLA's latent. There is nothing to absorb, so `absorb`
    (the decoding path's flag) changes nothing here.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.attention_head_dim
        self.softmax_scale = cfg.softmax_scale
        H, G, dh, D = self.n_heads, self.n_kv_heads, self.head_dim, cfg.hidden_size
        self.q_proj = Linear(D, H * dh, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, G * dh, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, G * dh, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * dh, D, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache=None, absorb: bool = False) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; mask and cache as for ``MLA.forward``."""
        B, T, _ = x.shape
        H, G, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rotary(self.q_proj(x).view(B, T, H, dh), cos, sin, interleaved=False)
        k = apply_rotary(self.k_proj(x).view(B, T, G, dh), cos, sin, interleaved=False)
        kv = torch.cat((k.flatten(2), self.v_proj(x)), dim=-1)  # [B, T, 2*G*dh]: what is cached
        if cache is not None:
            kv = cache.update(self.layer_id, kv)  # [B, S, 2*G*dh]
        S = kv.shape[1]
        if mask is None and T > 1 and S != T:
            raise ValueError("a causal mask is needed when queries and keys differ in length")
        k, v = kv.view(B, S, 2, G, dh).transpose(1, 3).unbind(2)  # [B, G, S, dh] each
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                           is_causal=mask is None and T > 1, scale=self.softmax_scale,
                                           enable_gqa=G != H)  # [B, H, T, dh]
        return self.o_proj(o.transpose(1, 2).flatten(2))


ATTENTION = {"mla": MLA, "gqa": GQA}


class RaggedPart:
    """`rows` x `tokens` of a ragged forward's tokens, attending through `cache` with `mask` (see
    ``MLA.forward``); absorb: this part's attention path."""

    def __init__(self, rows: int, tokens: int, mask: torch.Tensor | None, cache, absorb: bool):
        self.rows, self.tokens, self.mask, self.cache, self.absorb = rows, tokens, mask, cache, absorb


class Ragged:
    """Parts of different shapes in one forward, passed where a cache goes.

    The hidden states are [1, N, D]: part 0's rows x tokens (row-major), then part 1's, and so on.
    Norms, projections and the MoE are token-wise, so they run once over all N tokens and read
    their weights once; attention alone runs per part, each part reshaped to [rows, tokens, D]
    against its own cache view and mask. The inference core uses it to decode its running rows
    and prefill a chunk of a waiting prompt in the same forward: on a CPU a separate chunk forward
    costs at least one more read of every weight, which is what stalls the streaming rows.
    """

    def __init__(self, parts: list[RaggedPart]):
        self.parts = parts

    def attend(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """attn over x [1, N, D] part by part (cos/sin [1, N, d/2]) -> [1, N, D]."""
        outs, start = [], 0
        for p in self.parts:
            n = p.rows * p.tokens
            part = slice(start, start + n)
            y = attn(x[:, part].reshape(p.rows, p.tokens, -1), cos[:, part].reshape(p.rows, p.tokens, -1),
                     sin[:, part].reshape(p.rows, p.tokens, -1), p.mask, p.cache, p.absorb)
            outs.append(y.reshape(1, n, -1))
            start += n
        return torch.cat(outs, dim=1)
