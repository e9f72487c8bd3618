"""DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1): the lightning indexer and top-k token selection.

    indexer = Indexer(cfg)                                   # self_attn.indexer of every MLA layer
    k_I = indexer.keys(x, cos, sin)                          # [B, S, d^I], cached beside MLA's latent
    idx, allowed = indexer.select(x, q_a, cos, sin, k_I, mask)   # top-k keys per query, eq. (2)
    kl = indexer_kl(scores, target, allowed)                 # the indexer's training loss, eq. (3)/(4)

A query t scores every earlier token s with a few small ReLU heads (eq. 1),

    I_{t,s} = Σ_j w_{t,j} · ReLU(q_{t,j} · k_s)           j = 1..H^I,  q, w from h_t,  k from h_s

and MLA then attends only to the `index_topk` tokens of highest I_{t,:} (eq. 2): in training and
prefill as a mask over the keys, in decoding by gathering just those k latents, so a decode step
reads O(k) latents however long the context (the indexer still reads every d^I-wide key: that is
the "lightning" part, d^I = 128 against MLA's 576 numbers per token and H^I = 64 ReLU heads
against 128 softmax heads). With k >= the number of keys every key is chosen and DSA is MLA.

The indexer key k_s is cached with MLA's latent as one vector per layer and token,
[c_KV ; k^R ; k^I] (``ModelConfig.cache_width``), so slots, pages, copy-on-write and the prefix
cache carry it unchanged. Its first qk_rope_head_dim dims are rotated in the half-split layout
(MLA's own are interleaved); k is LayerNorm'ed (with a bias) as in the released checkpoints.

Training (V3.2 §2.1.1): `set_stage(model, "warmup")` freezes everything but the indexers, keeps
attention dense and records each layer's index scores and attention distribution for eq. (3);
`"sparse"` trains everything with top-k attention, the indexer seeing a detached input so that only
eq. (4) trains it and only the language-modelling loss trains the rest.

Shapes: B batch, T queries, S keys, H^I indexer heads, d^I their size, k index_topk.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Linear, apply_rotary

STAGES = ("warmup", "sparse")
_SCORE_BUDGET = 1 << 25  # floats of ReLU scores computed at once: long prefills are scored in query chunks


class Indexer(nn.Module):
    """The lightning indexer of one MLA layer (checkpoint keys ``self_attn.indexer.*``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope_dim = cfg.qk_rope_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)  # from MLA's c_Q
        self.wk = Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, bias=False)  # w_{t,j}
        self.stage: str | None = None  # None: inference; "warmup" | "sparse": record for the loss
        self.record: tuple | None = None  # (scores, allowed) of the last training forward

    def _rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rotary(rot, cos, sin, interleaved=False), rest), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """k^I of x [B, T, D]: [B, T, d^I], what the cache keeps beside the latent."""
        return self._rotate(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: torch.Tensor, q_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """Eq. (1), I_{t,s} for queries x [B, T, D] (q_a: MLA's normed compressed query [B, T, d'_c])
        against keys [B, S, d^I] -> [B, T, S] in fp32, unmasked."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q = self._rotate(self.wq_b(q_a).view(B, T, H, d), cos, sin)  # [B, T, H, d]
        # d^-1/2 > 0 commutes with the ReLU; every head's dot products in one bmm: [B, T*H, S]
        relu = torch.bmm(q.flatten(1, 2).float(), keys.float().transpose(1, 2)).relu_() * d ** -0.5
        w = self.weights_proj(x).float() * H ** -0.5  # [B, T, H]
        return torch.bmm(w.view(B * T, 1, H), relu.view(B * T, H, -1)).view(B, T, -1)

    def select(self, x, q_a, cos, sin, keys, mask) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The top-k keys of every query (eq. 2): (idx [B, T, k] or None when k >= S so that every
        key is chosen, allowed [B, T, S] bool: the keys the mask lets each query see).

        mask: bool [B, 1, T, S] or None (causal, or everything for one query). A chosen index that
        the mask forbids (a query with fewer than k visible keys) is dropped again by `allowed`."""
        B, T, _ = x.shape
        S = keys.shape[1]
        allowed = _allowed(mask, B, T, S, keys.device)
        if self.topk >= S:
            return None, allowed
        step = max(1, _SCORE_BUDGET // (self.n_heads * S * B))
        idx = []
        for a in range(0, T, step):
            part = slice(a, a + step)
            scores = self.scores(x[:, part], q_a[:, part], cos[:, part], sin[:, part], keys)
            idx.append(scores.masked_fill_(~allowed[:, part], float("-inf")).topk(self.topk, dim=-1).indices)
        return torch.cat(idx, dim=1), allowed


def _allowed(mask: torch.Tensor | None, B: int, T: int, S: int, device) -> torch.Tensor:
    """bool [B, T, S]: what the attention mask lets each query see (None: causal at the end of S)."""
    if mask is not None:
        return mask[:, 0].expand(B, T, S)
    keys = torch.arange(S, device=device)
    return (keys <= torch.arange(S - T, S, device=device)[:, None]).expand(B, T, S)


def chosen_mask(idx: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention mask [B, 1, T, S] of eq. (2): the chosen keys that the mask allows."""
    return (torch.zeros_like(allowed).scatter_(-1, idx, True) & allowed).unsqueeze(1)


def gather_chosen(kv: torch.Tensor, idx: torch.Tensor, allowed: torch.Tensor, width: int):
    """Decoding's sparse read: only the chosen latents. kv [B, S, W'] (the cache's whole vectors:
    contiguous rows copy fastest), idx [B, T, k] -> (latents [B*T, k, width], mask [B*T, 1, 1, k]):
    each query becomes its own row of one-query attention."""
    B, T, k = idx.shape
    rows = kv[torch.arange(B, device=kv.device)[:, None], idx.reshape(B, T * k)]  # [B, T*k, W']
    return rows[..., :width].view(B * T, k, width), allowed.gather(-1, idx).view(B * T, 1, 1, k)


# ----------------------------------------------------------------------------- training (V3.2 §2.1.1)

def set_stage(model: nn.Module, stage: str | None) -> list[Indexer]:
    """Put every indexer of `model` in a training stage and return them.

    "warmup": attention stays dense, everything but the indexers is frozen, eq. (3) trains them.
    "sparse": top-k attention, everything trains; the indexers' input is detached so eq. (4) alone
    trains them. None: back to inference (records dropped; requires_grad is left as it is)."""
    if stage not in (None, *STAGES):
        raise ValueError(f"indexer stage {stage!r}: expected one of {', '.join(STAGES)}")
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    if stage is not None and not indexers:
        raise ValueError(f"indexer stage {stage!r}: the model has no lightning indexer "
                         f"(model_type {model.config.model_type}; DSA is deepseek_v32)")
    if stage == "warmup":
        model.requires_grad_(False)
        for m in indexers:
            m.requires_grad_(True)
    for m in indexers:
        m.stage, m.record = stage, None
    return indexers


def record_for_loss(indexer: Indexer, mla, x, q_a, cos, sin, keys, q_nope, q_pe, kv, allowed) -> None:
    """Keep what eq. (3)/(4) need from one training forward: the index scores (gradient to the
    indexer only: its inputs are detached) and the main attention's head-summed, L1-normalised
    distribution over `allowed` (the keys the attention itself used), without gradient."""
    scores = indexer.scores(x.detach(), q_a.detach(), cos, sin, keys.detach())
    with torch.no_grad():
        B, T, H, _ = q_nope.shape
        R = mla.kv_lora_rank
        w_uk = mla.kv_b_proj.weight.view(H, -1, R)[:, :mla.qk_nope_head_dim]  # [H, dn, R]
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        logits = torch.einsum("bthr,bsr->bths", torch.cat((q_lat, q_pe), -1).float(), kv.float()) * mla.softmax_scale
        p = logits.masked_fill(~allowed[:, :, None], float("-inf")).softmax(-1).nan_to_num(0.0).sum(2)  # [B,T,S]
        target = p / p.sum(-1, keepdim=True).clamp(min=1e-20)
    indexer.record = (scores, target, allowed)


def indexer_kl(scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Eq. (3)/(4): mean over queries of D_KL(p_{t,S_t} || Softmax(I_{t,S_t})), S_t the keys in
    `allowed` (every visible key in the warm-up, the chosen ones in the sparse stage).

    scores [B, T, S] (I), target [B, T, S] (p, 0 outside S_t, rows summing to 1), allowed bool."""
    log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    terms = torch.where(target > 0, target * (target.clamp(min=1e-20).log() - log_q), torch.zeros_like(target))
    has = allowed.any(-1)
    return terms.sum(-1)[has].mean() if has.any() else scores.sum() * 0


def indexer_loss(indexers: list[Indexer]) -> torch.Tensor | None:
    """Σ over layers of eq. (3)/(4) from the last forward's records (None when nothing was recorded)."""
    losses = [indexer_kl(*m.record) for m in indexers if m.record is not None]
    for m in indexers:
        m.record = None
    return torch.stack(losses).sum() if losses else None
