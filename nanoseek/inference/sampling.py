"""Token choice for the inference core: greedy, temperature / top-k / top-p sampling, and the
speculative acceptance rules. Pure functions on tensors.

    probs = sampling_probs(logits, temperature=0.8, top_k=50, top_p=0.95)   # [..., V]
    ids = sample(logits, temperature=0.8, generator=g)                      # [...]
    n_ok, nxt = speculative_accept(p, q, drafts, generator=g)               # speculative sampling

Greedy (temperature 0) is always argmax; everything else draws from the filtered distribution
with an explicit ``torch.Generator``, so a seed reproduces a run.
"""

from __future__ import annotations

import torch


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None,
                      min_p: float | None = None) -> None:
    """Raise ValueError for settings no sampler can honour."""
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: must be a number >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be a positive integer or None")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1] or None")
    if min_p is not None and (not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p={min_p!r}: must be in [0, 1] or None")


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """The distribution a sampler draws from: softmax(logits / T) restricted to the top-k tokens,
    to the smallest set whose probability reaches top_p (nucleus) and to the tokens at least min_p
    times as likely as the most likely one, renormalised. fp32 [..., V].
    """
    if temperature <= 0:
        raise ValueError("sampling_probs needs temperature > 0; greedy is argmax")
    logits = logits.float()
    # shift by the max first: the top logit becomes 0, so a tiny T (1e-40) gives -inf elsewhere, not inf - inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [..., V] -> ids [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           min_p: float | None = None) -> torch.Tensor:
    """logits [..., V] -> token ids [...]: argmax when temperature is 0, else a draw."""
    if temperature <= 0:
        return logits.argmax(-1)
    return draw(sampling_probs(logits, temperature, top_k, top_p, min_p), generator)


# ----------------------------------------------------------------------------- logits controls

def penalize(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, presence: torch.Tensor,
             frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence/frequency penalties and CTRL's repetition penalty, one setting per row.

    logits [n, V]; counts [n, V] how often each token was generated so far; seen [n, V] bool, in
    the prompt or generated; presence, frequency, repetition [n]. A generated token loses
    frequency x count + presence (OpenAI's rule, on generated tokens only); a seen token's logit
    is divided by the repetition penalty when positive and multiplied by it when negative (so
    > 1 always makes it less likely).
    """
    logits = logits.float()
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int):
    """log-softmax of logits [m, V] -> (the chosen tokens' log-probs [m], top-n ids [m, n],
    their log-probs [m, n]); fp32."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(n, dim=-1) if n else None
    empty = torch.zeros(lp.shape[0], 0, dtype=torch.long)
    return (lp.gather(-1, chosen[:, None]).squeeze(-1), empty if top is None else top.indices,
            empty.float() if top is None else top.values)


# ----------------------------------------------------------------------------- speculative decoding

def greedy_accept(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: keep the longest draft prefix equal to the target's argmax.

    logits [B, k+1, V] are the target model's at the positions before each draft and after the
    last; drafts [B, k]. Returns (accepted [B] in 0..k, next token [B]): the argmax at the first
    mismatch, or the bonus argmax after the last draft when all are kept. The output is token for
    token what plain greedy decoding makes.
    """
    target = logits.argmax(-1)  # [B, k+1]
    k = drafts.shape[1]
    accepted = (drafts == target[:, :k]).long().cumprod(1).sum(1)
    return accepted, target.gather(1, accepted[:, None]).squeeze(1)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): output tokens follow p exactly.

    p [B, k+1, V] target distributions, q [B, k, V] draft distributions the drafts [B, k] were
    drawn from. Draft x_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection the next token is drawn from the residual norm(max(0, p_i - q_i)); when all k are
    kept, a bonus token is drawn from p_k. Returns (accepted [B] in 0..k, next token [B]).
    """
    B, k = drafts.shape
    p_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=generator, device=p.device)
    keep = u * q_x < p_x  # u < p/q without dividing by a zero q
    accepted = keep.long().cumprod(1).sum(1)  # [B]
    q_pad = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)  # all kept: residual of p_k - 0 is p_k
    idx = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    residual = (p.gather(1, idx) - q_pad.gather(1, idx)).squeeze(1).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # p == q on the support leaves no residual mass; rejection then has probability 0, but guard it
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p.gather(1, idx).squeeze(1))
    return accepted, draw(residual, generator)
