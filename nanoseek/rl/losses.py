"""The GRPO family of policy losses, one function per algorithm, plus the KL terms.

    adv = grpo_advantages(rewards)                       # rewards [prompts, G] -> [prompts, G]
    logp = token_logprobs(logits, tokens)                # [B, T]: log pi(o_t | q, o_<t)
    loss, stats = grpo_loss(logp, old_logp, adv.flatten(), mask, ref_logp, beta=0.04)
    loss.backward()

GRPO (DeepSeekMath §4.1) drops PPO's critic: the baseline of a completion is the mean reward of
the G completions sampled for the same prompt, scaled by their standard deviation. Per token of
completion i, with the ratio r = pi(o_t) / pi_old(o_t) and advantage A_i:

    surrogate_t = min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)          (PPO's clip)
    kl_t        = pi_ref / pi - log(pi_ref / pi) - 1                            (k3, unbiased, >= 0)
    J = mean over completions of ( mean over its tokens of (surrogate_t - beta kl_t) )

The variants differ only in the advantage and in how per-token terms are averaged:

    grpo_loss      DeepSeekMath: mean over each completion's tokens, then over completions.
    dr_grpo_loss   Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): advantages
                   without the std (dr_grpo_advantages) and a sum over tokens divided by a
                   constant (the generation budget), which removes the length bias.
    dapo_loss      DAPO (Yu et al. 2025): token-level mean over all tokens of the batch, usually
                   with clip-higher (eps_high = 0.28 > eps_low = 0.2) and beta = 0.

Every loss takes normalisers (`num_sequences`, `num_tokens`) like nanoseek.train.losses: the
trainer passes the counts of the whole batch, so micro-batches add up to the full-batch gradient.
Logit distillation's forward and reverse KL live here too (`forward_kl`, `reverse_kl`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- advantages


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group: rewards [prompts, G] -> [prompts, G].

    std is torch's default (Bessel-corrected, as in TRL and verl). A group whose rewards are all
    equal gets zero advantages: it carries no learning signal.
    """
    _check_groups(rewards)
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean(r) (Dr. GRPO: dividing by the std up-weights too-easy and too-hard prompts)."""
    _check_groups(rewards)
    return rewards - rewards.mean(-1, keepdim=True)


def _check_groups(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G] with G >= 2 completions per prompt, got "
                         f"shape {tuple(rewards.shape)}")


# ----------------------------------------------------------------------------- per-token pieces


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens]: logits [B, T, V], tokens [B, T] -> [B, T], fp32.

    Dividing by the sampling temperature makes pi the distribution the engine drew from.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each position's distribution: [B, T, V] -> [B, T] (nats), fp32."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per sampled token (DeepSeekMath eq. 4):

        exp(ref_logp - logp) - (ref_logp - logp) - 1

    Unbiased for samples from pi, never negative, exactly zero when pi == pi_ref.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token (to maximise) and where the clip was active.

    logp/old_logp [B, T], advantages [B] (one per completion). Returns (objective [B, T],
    clipped [B, T] bool: the token's gradient is zeroed by the clip).
    """
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return torch.minimum(unclipped, clipped), clipped < unclipped


def _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high):
    """Per-token loss (-surrogate + beta kl) [B, T] and the batch statistics every variant logs."""
    surrogate, was_clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    per_token = -surrogate
    mask = mask.to(per_token.dtype)
    n = mask.sum().clamp(min=1)
    stats = {"clip_fraction": float((was_clipped * mask).sum() / n)}
    if beta > 0:
        if ref_logp is None:
            raise ValueError(f"beta={beta}: the KL term needs the reference model's ref_logp")
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl"] = float((kl.detach() * mask).sum() / n)
    return per_token * mask, mask, stats


# ----------------------------------------------------------------------------- the variants


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.04, eps_low: float = 0.2,
              eps_high: float | None = None, num_sequences: int | None = None) -> tuple[torch.Tensor, dict]:
    """DeepSeekMath's GRPO: -(1/N) sum_i (1/|o_i|) sum_t (surrogate_it - beta kl_it).

    logp, old_logp, ref_logp, mask [B, T] over completion tokens (mask 1 on the completion);
    advantages [B]. num_sequences: N over the whole batch (default B). Returns (loss, stats).
    """
    per_token, mask, stats = _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high)
    per_sequence = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.sum() / (num_sequences or logp.shape[0]), stats


def dr_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
                 eps_high: float | None = None, num_sequences: int | None = None,
                 max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Dr. GRPO: -(1/N) sum_i sum_t (surrogate_it - beta kl_it) / L, L a constant (the generation
    budget max_tokens; default the padded length T), so long and short completions weigh the same
    per token. Pair with dr_grpo_advantages."""
    per_token, mask, stats = _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high)
    L = max_tokens or logp.shape[1]
    return per_token.sum() / (L * (num_sequences or logp.shape[0])), stats


def dapo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = 0.28, num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """DAPO's token-level policy gradient: -(1/sum_i |o_i|) sum_i sum_t (surrogate_it - beta kl_it),
    with clip-higher (eps_high 0.28 by default). num_tokens: completion tokens of the whole batch."""
    per_token, mask, stats = _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high)
    return per_token.sum() / (num_tokens or mask.sum().clamp(min=1)), stats


# ----------------------------------------------------------------------------- distillation


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, num_tokens: int | None = None) -> torch.Tensor:
    """KL(p_teacher || p_student) averaged over masked positions (mean-seeking: the student covers
    every mode of the teacher). logits [B, T, V], mask [B, T]."""
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return _masked_mean(kl, mask, num_tokens)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, num_tokens: int | None = None) -> torch.Tensor:
    """KL(p_student || p_teacher) averaged over masked positions (mode-seeking, as in MiniLLM)."""
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    kl = (s.exp() * (s - t)).sum(-1)
    return _masked_mean(kl, mask, num_tokens)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: int | None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (num_tokens or mask.sum().clamp(min=1))
