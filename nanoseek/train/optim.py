"""AdamW with decay only where it belongs, and the two learning-rate schedules.

    opt = build_adamw(model, lr=3e-3, weight_decay=0.1)
    for step in range(steps):
        set_lr(opt, 3e-3 * warmup_cosine(step, steps, warmup_steps=50, min_ratio=0.1))

warmup_cosine: linear warmup, then cosine down to min_ratio (DeepSeek-V2's choice is step
decay; cosine is the common default). warmup_stable_decay (WSD, as in DeepSeek-V3's long
constant phase and MiniCPM): warmup, a long constant stretch, then a linear decay over the final
`decay_fraction` of training, so a run can be extended from any point of the stable phase.
Schedules are pure functions of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, biases and the embedding table do not (decaying a lookup table
    only shrinks rare tokens' rows)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and "embed_tokens" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW(β1=0.9, β2=0.95, as DeepSeek-V2/V3) over `param_groups`.

    fused=True: one kernel per parameter group instead of ~10 elementwise passes per tensor
    (on CPU as on GPU), which matters for small models whose step is mostly elementwise work.
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier for 0-based optimizer step `step`: (step+1)/warmup, then a cosine from 1 to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1,
                        decay_fraction: float = 0.2) -> float:
    """LR multiplier: linear warmup, 1.0 until the last `decay_fraction` of steps, then linear to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1 - min_ratio) * progress
