"""The training objectives of DeepSeek-V3, one function each.

    ce   = cross_entropy(logits, targets)                          # next token
    mtp  = mtp_loss(mtp_logits, [mtp_targets(targets, doc_ids, k) for k in 1..D])
    bal  = sum(sequence_balance_loss(moe.scores, moe.indices) for moe in model.moe_layers())
    loss = ce + lam * mtp + alpha * bal                            # lam = 0.3 (V3), alpha = 1e-4

Targets use -100 for "no loss here" (across packed documents, padding, non-assistant tokens).
Every loss takes an optional normaliser (`num_tokens`, `num_sequences`): the training loop
passes the count over the whole global batch, so that gradient accumulation and data
parallelism add up to exactly the gradient of one big batch. Without it, the batch's own count
is used (a plain mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_tokens: int | float | None = None) -> torch.Tensor:
    """Σ_i -log p(targets_i | logits_i) / num_tokens over targets != -100, in fp32.

    logits [B, T, V], targets [B, T]; num_tokens defaults to the count of scored targets.
    """
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    if num_tokens is None:
        num_tokens = int((targets != IGNORE).sum())
    return total / max(num_tokens, 1)


def mtp_targets(targets: torch.Tensor, doc_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets for MTP depth k: at position i the token i+k+1, i.e. ``targets[i+k]``.

    Masked (-100) where i+k runs past the row or into another document, because the MTP
    module at i reads Emb(t_{i+k}) and must not see the next document. Deriving them from the
    next-token targets keeps every mask those carry (padding, SFT's non-assistant tokens).
    """
    if depth < 1:
        raise ValueError(f"depth={depth}: MTP depths start at 1")
    out = torch.full_like(targets, IGNORE)
    T = targets.shape[1]
    if depth >= T:
        return out
    same_doc = doc_ids[:, :-depth] == doc_ids[:, depth:]
    out[:, :-depth] = targets[:, depth:].masked_fill(~same_doc, IGNORE)
    return out


def mtp_loss(mtp_logits: list[torch.Tensor], targets: list[torch.Tensor],
             num_tokens: list[int] | None = None) -> torch.Tensor:
    """L_MTP = (1/D) Σ_k CE(depth-k logits, depth-k targets)  (DeepSeek-V3 eq. 24-25, before λ).

    mtp_logits and targets hold one [B, T, V] / [B, T] tensor per depth k = 1..D.
    """
    if len(mtp_logits) != len(targets):
        raise ValueError(f"{len(mtp_logits)} MTP depths of logits but {len(targets)} of targets")
    if not mtp_logits:
        return torch.zeros(())
    counts = num_tokens or [None] * len(targets)
    losses = [cross_entropy(lg, tg, n) for lg, tg, n in zip(mtp_logits, targets, counts)]
    return torch.stack(losses).mean()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None = None,
                          num_sequences: int | None = None) -> torch.Tensor:
    """Complementary sequence-wise balance loss Σ_i f_i P_i (DeepSeek-V3 eq. 17-20, before α).

    Per sequence of T tokens, with E routed experts and K chosen per token:
        f_i = E / (K T) · #{t : expert i in token t's top-K}    (load; 1 when uniform)
        P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t}                    (mean normalised affinity)
    The value is 1 for perfectly uniform routing; its gradient flows through P only.
    scores [B, T, E] (router scores, unbiased), indices [B, T, K], valid [B, T] bool (tokens
    to count; default all). Returns Σ_sequences loss / num_sequences (default B).
    """
    B, T, E = scores.shape
    K = indices.shape[-1]
    weight = torch.ones(B, T, device=scores.device) if valid is None else valid.float()
    n_tok = weight.sum(1).clamp(min=1)  # [B]
    chosen = torch.zeros(B, T, E, device=scores.device).scatter_(2, indices, 1.0)
    f = (chosen * weight[..., None]).sum(1) * E / (K * n_tok[:, None])  # [B, E]
    s = scores.float() / scores.float().sum(-1, keepdim=True).clamp(min=1e-20)
    P = (s * weight[..., None]).sum(1) / n_tok[:, None]  # [B, E]
    per_sequence = (f.detach() * P).sum(-1)  # [B]
    return per_sequence.sum() / (num_sequences or B)


class _LinearCrossEntropy(torch.autograd.Function):
    """CE(hidden @ weight.T, targets) summed, with both gradients computed chunk by chunk in the
    forward pass: the [N, V] logits never exist whole, and there is no log-softmax backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        device = hidden.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        for a in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[a:a + chunk_size], targets[a:a + chunk_size]
            logits = (h @ weight.t()).float()  # bf16 matmul under autocast, softmax in fp32
            scored = t != IGNORE
            safe = t.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe).squeeze(1)) * scored).sum()
            if not (need_h or need_w):
                continue
            # d/dlogits of Σ CE = softmax - onehot(target), zero on unscored rows (in place).
            g = logits.sub_(lse.unsqueeze(1)).exp_()
            g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
            g.mul_(scored.unsqueeze(1))
            g = g.to(mm_dtype)
            if need_h:
                grad_h[a:a + chunk_size] = g @ weight.to(mm_dtype)
            if need_w:
                grad_w += (g.t() @ h.to(mm_dtype)).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         num_tokens: int | float | None = None, chunk_size: int = 2048) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets, num_tokens), fused: the same value and gradients
    without materialising the [B·T, V] logits (DeepSeek's 129k vocabulary makes those the
    largest activation of a training step). hidden [B, T, D] or [N, D], weight [V, D]."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if num_tokens is None:
        num_tokens = int((t != IGNORE).sum())
    return _LinearCrossEntropy.apply(h, weight, t, chunk_size) / max(num_tokens, 1)
