"""DeepSeek-V4 (``model_type: deepseek_v4``): the model, in reading order.

    rotate_tail        partial RoPE on the last qk_rope_head_dim channels, pairs (x0,x1),(x2,x3).. in place
    compress           m tokens -> one KV entry: a per-channel softmax-gated sum; CSA's windows overlap
    Compressor         projections + compress + norm + RoPE at the window's position (§2.3.1 eqs 9-12, §2.3.2 eqs 20-23)
    LightningIndexer   per query, the top-k compressed entries by sum_h w_h ReLU(q_h · K) (§2.3.1 eqs 13-17)
    Attention          shared-KV multi-query attention over [sliding window ; compressed entries] with a
                       learned sink per head, then the grouped low-rank output projection (§2.3)
    HyperConnection    mHC: n residual streams, read by `pre`, written by `post`, mixed by a
                       Sinkhorn-Knopp doubly stochastic `comb` (§2.2)
    HashGate           the first num_hash_layers route token t to experts tid2eid[t] (§2.1)
    Block -> MTPBlock -> V4Transformer

Each layer's attention is one of three kinds (``cfg.compress_ratio(i)``): 0 a sliding window of
``window_size`` recent tokens only; 4 compressed sparse attention (CSA: window + entries of 4 tokens
with overlapping windows, of which the lightning indexer picks index_topk per query); any other rate
(128 in the releases) heavily compressed attention (HCA: window + every entry). The feed-forward is
nanoseek's DeepSeekMoE (``model.MoE``) with sqrt(softplus) scoring, clipped SwiGLU and, for the first
layers, hash routing. Module names follow transformers' ``DeepseekV4ForCausalLM``; ``hf/keys.py`` maps
them to the checkpoint's published keys (``layers.N.attn.wq_a`` ...).

Shapes: B batch, T query tokens, D hidden, n hc_mult streams, H heads, dh head_dim, r rope dims,
m compression rate, N compressed entries.

Every compression and window is a function of absolute positions, so the same code runs a whole
sequence (no cache) and the engine's incremental steps (``inference/compressed.py``): the cache hands
each layer the window's earlier tokens and the projections of the windows not yet closed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Linear, RMSNorm, rope_frequencies
from .model import SCORING, CausalLM, MoE

QUERY_BLOCK = 256  # queries attended at once: bounds a long prefill's score matrix
CSA_RATIO = 4  # DeepSeek's reference: rate 4 means overlapping windows and a lightning indexer
FP32_PARTS = {"attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias"}  # held in fp32 whatever the model's dtype


def keeps_fp32(name: str) -> bool:
    """Whether parameter `name` is one V4 keeps in fp32 (as DeepSeek ships it): the mHC mappings,
    attention sinks and compression position biases, small tensors whose rounding moves every stream."""
    return any(part in FP32_PARTS for part in name.split("."))


# ----------------------------------------------------------------------------- primitives

def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (V4's per-head query norm and mHC's input norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rotate_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2·(r/2) channels of x [B, T, (H,) d] by position, adjacent channels paired
    (the checkpoint's layout, kept: V4 reads keys as values); the other channels pass through.
    cos/sin [B, T, r/2] (fp32). With -sin this undoes the rotation (the attention output's)."""
    r = 2 * cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    a, b = x[..., -r:].float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((x[..., :-r], rotated), dim=-1)


class Rotary(nn.Module):
    """cos/sin of one RoPE base: "main" (rope_theta, plain) for window-only layers, "compress"
    (compress_rope_theta with the config's YaRN frequencies; V4 keeps cos/sin unscaled) for CSA/HCA."""

    def __init__(self, cfg: ModelConfig, compressed: bool):
        super().__init__()
        self.cfg, self.compressed = cfg, compressed
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> torch.Tensor:
        """The inverse frequencies [r/2] (a loader recomputes them after building on the meta device)."""
        cfg = self.cfg
        if self.compressed:
            return rope_frequencies(cfg.replace(rope_theta=cfg.compress_rope_theta))[0]
        return rope_frequencies(cfg.replace(rope_type="default"))[0]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        return freqs.cos(), freqs.sin()


def compress(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, m: int,
             overlap: bool) -> torch.Tensor:
    """Every complete window of m tokens of kv/gate [B, L, c] (L = n·m) -> one entry [B, n, d].

    Entry i = sum_j softmax_j(gate_j + B_j) ⊙ kv_j over its window, per channel. Without overlap
    (HCA) d = c and the window is the m tokens. With overlap (CSA) each token projects two series,
    c = 2d: its second half joins its own window, its first half the next window's, so entry i pools
    2m slots (window i-1's first halves, window i's second halves); the first window of the
    segment has no predecessor (weight 0)."""
    B, L, c = kv.shape
    n = L // m
    if n == 0:
        return kv.new_zeros(B, 0, c // 2 if overlap else c)
    kv, gate = kv[:, :n * m].view(B, n, m, c), gate[:, :n * m].view(B, n, m, c) + position_bias
    if overlap:
        d = c // 2
        prev_kv = torch.cat((kv.new_zeros(B, 1, m, d), kv[:, :-1, :, :d]), dim=1)
        prev_gate = torch.cat((gate.new_full((B, 1, m, d), float("-inf")), gate[:, :-1, :, :d]), dim=1)
        kv = torch.cat((prev_kv, kv[..., d:]), dim=2)  # [B, n, 2m, d]
        gate = torch.cat((prev_gate, gate[..., d:]), dim=2)
    return (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)


class Compressor(nn.Module):
    """Tokens -> compressed KV entries at rate m (CSA: 2 series, overlapping windows; HCA: 1).

    C = H·W^KV, Z = H·W^Z (kv_proj, gate_proj), pooled by ``compress``, RMS-normed (kv_norm), and
    RoPE'd at the window's first position i·m. ``raw`` gives the projections a cache keeps for
    windows still open; ``entries`` turns a run of them into entries."""

    def __init__(self, cfg: ModelConfig, m: int, head_dim: int):
        super().__init__()
        self.m, self.head_dim, self.overlap = m, head_dim, m == CSA_RATIO
        width = head_dim * (2 if self.overlap else 1)
        self.kv_proj = Linear(cfg.hidden_size, width, bias=False)
        self.gate_proj = Linear(cfg.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(m, width))
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, 2·width]: [C ; Z] per token."""
        return torch.cat((self.kv_proj(x), self.gate_proj(x)), dim=-1)

    def entries(self, raw: torch.Tensor, first: int, rotary: Rotary) -> torch.Tensor:
        """raw [B, L, 2·width] of positions first.. (first a multiple of m) -> entries [B, L // m, dh]."""
        kv, gate = raw.chunk(2, dim=-1)
        out = self.kv_norm(compress(kv, gate, self.position_bias.float(), self.m, self.overlap))
        pos = (first + self.m * torch.arange(out.shape[1], device=out.device)).expand(out.shape[0], -1)
        return rotate_tail(out, *rotary(pos))


class LightningIndexer(nn.Module):
    """CSA's choice of entries (§2.3.1): its own compressor at index_head_dim, queries from the
    attention's compressed query c^Q, and I_{t,s} = sum_h w_{t,h} · ReLU(q_{t,h} · K^I_s) / sqrt(d^I),
    w = W^w h_t / sqrt(H^I); each query keeps the top index_topk entries it may see."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.compressor = Compressor(cfg, CSA_RATIO, cfg.index_head_dim)
        self.q_b_proj = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.weights_proj = Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)

    def select(self, x: torch.Tensor, q_res: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries x [B, T, D] over entry keys [B, N, d^I] -> (indices [B, T, k], valid [B, T, k]): each
        query's top min(index_topk, N) entries among those it may see (visible [B, T, N]); a pick
        past what it may see (fewer than k visible) is not valid."""
        B, T, _ = x.shape
        H = self.n_heads
        q = rotate_tail(self.q_b_proj(q_res).view(B, T, H, self.head_dim), cos, sin)
        # keys @ q^T, every query head at once: the long side streams through the product once
        relu = torch.matmul(keys.float(), q.flatten(1, 2).float().transpose(1, 2)).relu_()  # [B, N, T*H]
        w = self.weights_proj(x).float() * (H ** -0.5 * self.head_dim ** -0.5)  # both scales commute with ReLU
        scores = torch.matmul(relu.view(B, -1, T, H).transpose(1, 2), w.unsqueeze(-1)).squeeze(-1)
        scores = scores.masked_fill(~visible, float("-inf"))  # [B, T, N]
        idx = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices
        return idx, visible.gather(-1, idx)


# ----------------------------------------------------------------------------- attention

class GroupedLinear(nn.Module):
    """g independent projections, one per head group (§2.3's grouped output projection): x [..., g, i]
    -> [..., g, o], weight [g·o, i] (the checkpoint's one matrix, group after group). Not an nn.Linear,
    so quantization leaves it whole."""

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...gi,goi->...go", x, self.weight.view(self.groups, -1, x.shape[-1]))


class Attention(nn.Module):
    """V4 attention (§2.3): H query heads, one shared key=value head of dh dims.

    c^Q = RMSNorm(W^DQ h); q = RoPE(RMSNorm_head(W^UQ c^Q)); kv = RoPE(RMSNorm(W^KV h)), RoPE on the
    last r channels only. Keys: the window's last window_size tokens, plus (CSA/HCA) compressed
    entries whose windows have closed (entry i holds tokens i·m..i·m+m-1, seen from position
    >= i·m+m-1); CSA attends only the indexer's picks. softmax over [scores ; sink_h] (the sink takes
    weight, gives no value), o = sum p_j kv_j, RoPE undone on o's tail (-sin at the query), then
    the grouped output projection: each of g head groups to d_g dims (o_a_proj), all to D (o_b_proj)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.window = cfg.num_attention_heads, cfg.head_dim, cfg.window_size
        self.groups, self.eps = cfg.o_groups, cfg.rms_norm_eps
        self.m = cfg.compress_ratio(layer_id)
        H, dh = self.n_heads, self.head_dim
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * dh, bias=False)
        self.kv_proj = Linear(cfg.hidden_size, dh, bias=False)
        self.kv_norm = RMSNorm(dh, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(cfg.o_groups, H * dh // cfg.o_groups, cfg.o_lora_rank)
        self.o_b_proj = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.compressor = Compressor(cfg, self.m, dh) if self.m else None
        self.indexer = LightningIndexer(cfg) if self.m == CSA_RATIO else None
        self.rotary = Rotary(cfg, compressed=bool(self.m))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """x [B, T, D] at positions [B, T] -> [B, T, D]. cache: see ``inference.compressed.CompressedCache``
        (each row's positions contiguous); without one, each row is a whole sequence from position 0,
        or several packed ones (positions restarting at 0), which never see each other."""
        B, T, _ = x.shape
        cos, sin = self.rotary(positions)
        q_res = self.q_a_norm(self.q_a_proj(x))  # c^Q [B, T, d'_c]
        q = rotate_tail(unit_rms(self.q_b_proj(q_res).view(B, T, self.n_heads, self.head_dim), self.eps), cos, sin)
        kv = rotate_tail(self.kv_norm(self.kv_proj(x)), cos, sin)  # [B, T, dh]
        keys, key_pos = (kv, positions) if cache is None else cache.window(self.layer_id, kv)
        docs = None  # packed rows: document ids
        if cache is None and T > 1 and bool((positions[:, 1:] == 0).any()):
            docs = (positions == 0).cumsum(-1)
        comp = self._compressed(x, positions, cache, docs) if self.compressor is not None else None
        o = torch.cat([self._attend_block(q, x, q_res, cos, sin, positions, keys, key_pos, docs, comp, a,
                                          min(a + QUERY_BLOCK, T)) for a in range(0, T, QUERY_BLOCK)], dim=1)
        o = rotate_tail(o, cos, -sin).reshape(B, T, self.groups, -1)
        return self.o_b_proj(self.o_a_proj(o).flatten(2))

    def _compressed(self, x, positions, cache, docs):
        """-> (entries [B, N, dh], their indexer keys [B, N, d^I] (CSA) or None, visible [B, T, N]:
        the closed ones each query may attend)."""
        comp = self.compressor
        raw = comp.raw(x) if self.indexer is None else torch.cat((comp.raw(x), self.indexer.compressor.raw(x)), -1)
        if docs is not None:
            parts, visible = self._packed_entries(raw, positions, docs)
        else:
            parts = self._entries(raw, 0) if cache is None else cache.entries(self.layer_id, raw, self.m, self._entries)
            visible = torch.arange(parts[0].shape[1], device=x.device) < ((positions + 1) // self.m).unsqueeze(-1)
        return parts[0], (parts[1] if self.indexer is not None else None), visible

    def _attend_block(self, q, x, q_res, cos, sin, positions, keys, key_pos, docs, comp, a, b):
        """Queries a..b-1 (a long prefill goes block by block): the window keys they may see, sliced
        to the span that holds them, and the compressed entries; CSA decoding gathers the k chosen
        entries instead of masking all of them."""
        qp, kp = positions[:, a:b, None], key_pos[:, None, :]
        allowed = (kp <= qp) & (kp > qp - self.window) & (kp >= 0)
        if docs is not None:
            allowed &= docs[:, a:b, None] == docs[:, None, :]
        cols = allowed.any(1).any(0).nonzero().flatten()
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
        window, qb = (keys[:, lo:hi], allowed[..., lo:hi]), q[:, a:b]
        if comp is None:
            return self._attend(qb, [window])
        entries, index_keys, visible = comp
        visible = visible[:, a:b]
        if index_keys is None:  # HCA: every closed entry
            return self._attend(qb, [window, (entries, visible)])
        idx, valid = self.indexer.select(x[:, a:b], q_res[:, a:b], cos[:, a:b], sin[:, a:b], index_keys, visible)
        if (b - a) * idx.shape[-1] * 4 <= entries.shape[1]:  # few queries: read just the chosen entries
            chosen = entries[torch.arange(entries.shape[0], device=x.device)[:, None, None], idx]  # [B, t, k, dh]
            return self._attend(qb, [window], chosen, valid)
        return self._attend(qb, [window, (entries, torch.zeros_like(visible).scatter_(-1, idx, valid))])

    def _packed_entries(self, raw, positions, docs):
        """Packed rows: each document's windows compressed on their own (a window never pools two
        documents); a query sees its own document's closed entries."""
        B = raw.shape[0]
        rows, owner, index = [], [], []
        for b in range(B):
            starts = (positions[b] == 0).nonzero().flatten().tolist() + [raw.shape[1]]
            docs_b = [torch.cat(p, -1)[0] for p in (self._entries(raw[b:b + 1, s:e], 0)
                                                    for s, e in zip(starts[:-1], starts[1:]))]
            rows.append(torch.cat(docs_b))
            owner += [torch.cat([torch.full((len(p),), d + 1) for d, p in enumerate(docs_b)])]
            index += [torch.cat([torch.arange(len(p)) for p in docs_b])]
        n = max(len(r) for r in rows)
        out = raw.new_zeros(B, n, rows[0].shape[-1])
        owner_t, index_t = torch.zeros(B, n, dtype=torch.long), torch.full((B, n), n, dtype=torch.long)
        for b, (r, o, i) in enumerate(zip(rows, owner, index)):
            out[b, :len(r)], owner_t[b, :len(r)], index_t[b, :len(r)] = r, o, i
        owner_t, index_t = owner_t.to(raw.device), index_t.to(raw.device)
        closed = index_t.unsqueeze(1) < ((positions + 1) // self.m).unsqueeze(-1)
        return out.split([self.head_dim, out.shape[-1] - self.head_dim], -1), \
            (owner_t.unsqueeze(1) == docs.unsqueeze(-1)) & closed

    def _entries(self, raw: torch.Tensor, first: int) -> tuple[torch.Tensor, ...]:
        """raw projections [B, L, ·] of positions first.. -> (keys [B, L // m, dh], CSA: indexer keys [B, L // m, d^I])."""
        if self.indexer is None:
            return (self.compressor.entries(raw, first, self.rotary),)
        main, index = raw.split([4 * self.head_dim, 4 * self.indexer.head_dim], dim=-1)
        return (self.compressor.entries(main, first, self.rotary),
                self.indexer.compressor.entries(index, first, self.rotary))

    def _attend(self, q: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]],
                chosen: torch.Tensor | None = None, chosen_ok: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, T, H, dh] over groups of keys = values [B, S, dh] (each with its allowed [B, T, S]: the
        window, the compressed entries) and, per query, chosen [B, T, k, dh] (chosen_ok [B, T, k]) ->
        [B, T, H, dh]: one softmax over all of them and the sink (the keys are never concatenated)."""
        scale = self.head_dim ** -0.5
        scores = [torch.einsum("bthd,bsd->bhts", q, k).float().mul_(scale).masked_fill_(~ok.unsqueeze(1), float("-inf"))
                  for k, ok in groups]
        if chosen is not None:
            extra = torch.einsum("bthd,btkd->bhtk", q, chosen).float().mul_(scale)
            scores.append(extra.masked_fill_(~chosen_ok.unsqueeze(1), float("-inf")))
        sink = self.sinks.float().view(1, -1, 1, 1).expand(*scores[0].shape[:-1], 1)
        p = torch.cat((*scores, sink), dim=-1).softmax(-1).to(q.dtype)
        p = p[..., :-1].split([s.shape[-1] for s in scores], dim=-1)
        out = sum(torch.einsum("bhts,bsd->bthd", pg, k) for pg, (k, _) in zip(p, groups))
        if chosen is not None:
            out = out + torch.einsum("bhtk,btkd->bthd", p[-1], chosen)
        return out


# ----------------------------------------------------------------------------- mHC

class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connections (§2.2): the residual is n streams X [B, T, n, D].

    From x = RMSNorm(flatten(X)): pre = σ(α_pre·x W_pre + b_pre) + ε, post = 2σ(α_post·x W_post + b_post),
    comb = Sinkhorn-Knopp(softmax(α_res·x W_res + b_res) + ε), t_max alternating column/row
    normalisations, a doubly stochastic n x n matrix. The block reads sum_i pre_i X_i and the new
    streams are post ⊗ f(...) + comb^T X. fn/base/scale hold W, b, α of all three, concatenated."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * cfg.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, T, n, D] -> (post [B, T, n], comb [B, T, n, n] (fp32), the block's input [B, T, D])."""
        n = self.n
        mix = F.linear(unit_rms(streams.flatten(2).float(), self.norm_eps), self.fn.float())
        pre, post, comb = mix.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.float().split([n, n, n * n])
        a_pre, a_post, a_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre * a_pre + b_pre) + self.eps
        post = 2 * torch.sigmoid(post * a_post + b_post)
        comb = torch.softmax(comb.unflatten(-1, (n, n)) * a_comb + b_comb.view(n, n), dim=-1) + self.eps
        comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        return post, comb, (pre.unsqueeze(-1) * streams).sum(2).to(streams.dtype)


def hc_collapse(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                eps: float, norm_eps: float) -> torch.Tensor:
    """The output head's read of the n streams [B, T, n, D] -> [B, T, D]: sum_i (σ(α·x W + b)_i + ε) X_i."""
    mix = F.linear(unit_rms(streams.flatten(2).float(), norm_eps), fn.float())
    pre = torch.sigmoid(mix * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * streams).sum(2).to(streams.dtype)


class HyperHead(nn.Module):
    """The final collapse of the streams before the output norm (``hc_collapse``'s parameters)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * cfg.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return hc_collapse(streams, self.hc_fn, self.hc_base, self.hc_scale, self.eps, self.norm_eps)


# ----------------------------------------------------------------------------- MoE and blocks

class HashGate(nn.Module):
    """Hash routing (§2.1): token t goes to the fixed experts tid2eid[t]; the learned scores
    sqrt(softplus(h·e_i)) of those experts, renormalised and scaled, weight them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.scoring_func, self.routed_scaling_factor = cfg.scoring_func, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> weights [N, K], indices [N, K], scores [N, E]."""
        scores = SCORING[self.scoring_func](F.linear(x.float(), self.weight.float()))
        indices = self.tid2eid[input_ids].long()
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


class Block(nn.Module):
    """X <- post_a ⊗ attn(norm(pre_a X)) + comb_a^T X, then the same with the MoE (§2.2)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = MoE(cfg)
        self.hashed = layer_id < cfg.num_hash_layers
        if self.hashed:
            self.mlp.gate = HashGate(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, cache=None):
        dtype = streams.dtype
        post, comb, h = self.attn_hc(streams)
        out = self.self_attn(self.input_layernorm(h), positions, cache)
        streams = post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams
        post, comb, h = self.ffn_hc(streams)
        out = self.mlp(self.post_attention_layernorm(h), input_ids if self.hashed else None)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


class MTPBlock(Block):
    """Multi-token prediction (as the V4 checkpoint ships it, ``mtp.k.*``): the main model's streams
    X and the next tokens' embeddings e enter as e_proj(enorm(e)) + h_proj(hnorm(X)) (broadcast over
    streams), one Block, then its own stream collapse and norm before the shared output head."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.e_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.h_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)

    def forward(self, streams, emb, input_ids, positions, cache=None):
        """-> the module's normed output [B, T, D] (its logits are lm_head of it)."""
        streams = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        return self.norm(self.hc_head(super().forward(streams, input_ids, positions, cache)))


class Backbone(nn.Module):
    """``model.*``: embeddings, the main blocks then the MTP blocks, the streams' final collapse, the norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(n)] +
                                    [MTPBlock(cfg, n + k) for k in range(cfg.num_nextn_predict_layers)])
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class V4Transformer(CausalLM):
    """The DeepSeek-V4 causal LM, with ``model.Transformer``'s interface (forward, forward_hidden,
    forward_train, moe_layers, num_params), so the engine, trainers and checkpoint code drive it alike.
    ``forward_hidden`` returns the collapsed streams before the final norm; ``forward_streams`` the
    streams themselves, which the MTP module reads (the engine keeps them for drafting)."""

    backbone = Backbone

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """N(0, initializer_range) for matrices and mHC projections; norms and mHC scales 1; biases,
        sinks and position biases 0; tid2eid a fixed pseudo-random table."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or leaf in ("scale", "hc_scale"):
                p.fill_(1.0)
            elif leaf in ("base", "hc_base", "sinks", "position_bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.modules():
            if isinstance(m, HashGate) and m.tid2eid.device.type != "meta":
                g = torch.Generator().manual_seed(0)
                V, K = m.tid2eid.shape
                m.tid2eid.copy_(torch.rand(V, m.weight.shape[0], generator=g).topk(K, dim=-1).indices)
            if isinstance(m, MoE) and m.gate.e_score_correction_bias is not None \
                    and m.gate.e_score_correction_bias.device.type != "meta":
                m.gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers]

    def _positions(self, input_ids, positions):
        if positions is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return positions

    def forward_streams(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                        inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> the residual streams after the last main layer [B, T, n, D]."""
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        positions = self._positions(input_ids, positions)
        streams = h.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in self.main_layers:
            streams = layer(streams, input_ids, positions, cache)
        return streams

    def forward_hidden(self, input_ids, positions=None, mask=None, cache=None, absorb=False, inputs_embeds=None):
        """-> [B, T, D] before the final norm. V4 builds its masks from positions, packed documents
        included (positions restart at 0 where one starts), so `mask` is not read; absorb is MLA's."""
        return self.model.hc_head(self.forward_streams(input_ids, positions, cache, inputs_embeds))

    def forward(self, input_ids, positions=None, mask=None, cache=None, absorb=False, inputs_embeds=None):
        """input_ids [B, T] -> logits [B, T, vocab_size]."""
        return self.lm_head(self.model.norm(self.forward_hidden(input_ids, positions, mask, cache, absorb,
                                                                inputs_embeds)))

    def forward_train(self, input_ids, positions=None, mask=None):
        """(final normed hidden [B, T, D], [MTP logits [B, T, V] per depth]), as ``Transformer.forward_train``.
        Packed documents are told apart by their positions, as in forward_hidden. Each MTP module
        reads the main model's streams (V4 ships one; depth k reads tokens i+k)."""
        streams = self.forward_streams(input_ids, positions)
        hidden = self.model.norm(self.model.hc_head(streams))
        positions = self._positions(input_ids, positions)
        mtp_logits = []
        for k, layer in enumerate(self.mtp_layers, start=1):
            nxt = torch.roll(input_ids, -k, dims=1)
            out = layer(streams, self.model.embed_tokens(nxt), nxt, positions)
            mtp_logits.append(self.lm_head(out))
        return hidden, mtp_logits
