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
    bnpo_loss      token-level mean over each micro-batch's tokens, averaged over micro-batches.

Orthogonal choices, each its own function picked once by the trainer (no flags inside the losses):
the advantage's scale (SCALE_REWARDS: group std, batch std, none), the importance-sampling level
(IMPORTANCE_SAMPLING: per token, or GSPO's per sequence, passed as ratio_fn), and
mask_truncated for DAPO's masking of completions cut by the length budget. With mu = 1 the
sampling policy is the current one: pass old_logp=None and pi_old = sg(pi) (ratio 1, same gradient)
saves a forward.

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


def batch_scaled_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(all rewards of the batch) + eps): the group baseline with one
    scale for the whole batch (scale_rewards="batch"; "Tricks or Traps", Liu et al. 2025), so an
    easy prompt's tiny differences are not blown up to unit size."""
    _check_groups(rewards)
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std() + eps)


# scale_rewards -> the advantage function: the group's std (GRPO), the batch's, or none (Dr. GRPO)
SCALE_REWARDS = {"group": grpo_advantages, "batch": batch_scaled_advantages, "none": dr_grpo_advantages}


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


def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(o_t)/pi_old(o_t) per token [B, T]: PPO's and GRPO's importance ratio."""
    return logp - old_logp


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025): one ratio per completion, the geometric mean of its token ratios,
    s_i = exp((1/|o_i|) sum_t log pi(o_it)/pi_old(o_it)), given to every token of the completion
    [B, T]; its gradient is s_i times the mean of the tokens' log-probability gradients."""
    m = mask.to(logp.dtype)
    seq = ((logp - old_logp) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return seq.expand_as(logp)


IMPORTANCE_SAMPLING = {"token": token_log_ratio, "sequence": sequence_log_ratio}


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float | None = None,
                      log_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token (to maximise) and where the clip was active.

    logp/old_logp [B, T], advantages [B] (one per completion); log_ratio [B, T] overrides
    logp - old_logp (GSPO's sequence-level ratio). Returns (objective [B, T], clipped [B, T] bool:
    the token's gradient is zeroed by the clip).
    """
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp if log_ratio is None else log_ratio)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return torch.minimum(unclipped, clipped), clipped < unclipped


def _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high, ratio_fn):
    """Per-token loss (-surrogate + beta kl) [B, T] and the batch statistics every variant logs.
    old_logp None: the policy that sampled is the current one (mu = 1), so pi_old = sg(pi)."""
    old_logp = logp.detach() if old_logp is None else old_logp
    surrogate, was_clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high,
                                               ratio_fn(logp, old_logp, mask))
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
              eps_high: float | None = None, num_sequences: int | None = None,
              ratio_fn=token_log_ratio) -> tuple[torch.Tensor, dict]:
    """DeepSeekMath's GRPO: -(1/N) sum_i (1/|o_i|) sum_t (surrogate_it - beta kl_it).

    logp, old_logp, ref_logp, mask [B, T] over completion tokens (mask 1 on the completion);
    advantages [B]. num_sequences: N over the whole batch (default B). Returns (loss, stats).
    """
    per_token, mask, stats = _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high, ratio_fn)
    per_sequence = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.sum() / (num_sequences or logp.shape[0]), stats


def dr_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
                 eps_high: float | None = None, num_sequences: int | None = None,
                 max_tokens: int | None = None, ratio_fn=token_log_ratio) -> tuple[torch.Tensor, dict]:
    """Dr. GRPO: -(1/N) sum_i sum_t (surrogate_it - beta kl_it) / L, L a constant (the generation
    budget max_tokens; default the padded length T), so long and short completions weigh the same
    per token. Pair with dr_grpo_advantages."""
    per_token, mask, stats = _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high, ratio_fn)
    L = max_tokens or logp.shape[1]
    return per_token.sum() / (L * (num_sequences or logp.shape[0])), stats


def dapo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = 0.28, num_tokens: int | None = None,
              ratio_fn=token_log_ratio) -> tuple[torch.Tensor, dict]:
    """DAPO's token-level policy gradient: -(1/sum_i |o_i|) sum_i sum_t (surrogate_it - beta kl_it),
    with clip-higher (eps_high 0.28 by default). num_tokens: completion tokens of the whole batch."""
    per_token, mask, stats = _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high, ratio_fn)
    return per_token.sum() / (num_tokens or mask.sum().clamp(min=1)), stats


def bnpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = None, num_micro_batches: int = 1,
              ratio_fn=token_log_ratio) -> tuple[torch.Tensor, dict]:
    """BNPO (Xiao et al. 2025, as TRL's loss_type="bnpo"): a token-level mean over this micro-batch's
    tokens, -(1/sum_{i in mb} |o_i|) sum_{i in mb} sum_t (...), averaged over the micro-batches; equal
    to DAPO when the whole batch is one micro-batch."""
    per_token, mask, stats = _terms(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high, ratio_fn)
    return per_token.sum() / mask.sum().clamp(min=1) / num_micro_batches, stats


# loss_type -> the loss function
LOSS_TYPES = {"grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "dapo": dapo_loss, "bnpo": bnpo_loss}


def mask_truncated(mask: torch.Tensor, finish_reasons: list[str]) -> torch.Tensor:
    """mask_truncated_completions (DAPO): a completion cut by the length budget ("length") is
    left out of the loss entirely; its reward (usually 0) still sets its group's baseline."""
    keep = torch.tensor([r != "length" for r in finish_reasons], dtype=torch.bool, device=mask.device)
    return mask & keep[:, None]


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
