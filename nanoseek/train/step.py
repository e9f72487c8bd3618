"""One optimizer step and the metrics log, shared by every training loop: pretraining and SFT
(loop.py), GRPO (rl/grpo.py) and logit distillation (rl/distill.py).

    loss.backward()                                  # each loop's own forward/backward, accumulated
    grad_norm = optimizer_step(model, optimizer, lr=cfg.lr_at(step), grad_clip=cfg.grad_clip,
                               loss=loss_value, where=f"step {step + 1}")
    log = MetricsLog(out / "metrics.jsonl")
    log.append({"step": step + 1, "loss": loss_value, "grad_norm": grad_norm})

The step clips the global gradient norm, stops the run on a non-finite norm or loss (an AdamW
step on NaN gradients would ruin every weight, and the checkpoint after it), sets the learning
rate, steps and clears the gradients. The loops differ in their losses, not in this.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from torch import nn

from .optim import set_lr


def optimizer_step(model: nn.Module, optimizer, lr: float, grad_clip: float, loss: float | None = None,
                   where: str = "training", clip=None) -> float:
    """Clip the gradient norm to `grad_clip` (0 = no clipping), raise FloatingPointError when it or
    `loss` is not finite, set the rate to `lr`, step, zero the gradients. Returns the norm before clipping.

    clip(params, max_norm) -> norm replaces torch's clip_grad_norm_ (sharded runs: parallelize.clip_grad_norm)."""
    clip = clip or nn.utils.clip_grad_norm_
    grad_norm = float(clip(model.parameters(), grad_clip or math.inf))
    if not (math.isfinite(grad_norm) and (loss is None or math.isfinite(loss))):
        what = f"gradient norm {grad_norm}" if loss is None else f"loss {loss} / gradient norm {grad_norm}"
        raise FloatingPointError(f"{where}: {what} is not finite; try a lower --lr or --grad-clip")
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row as a line (a crash mid-write tears at most this line; readers skip it)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class MetricsLog:
    """A run's metrics.jsonl: one row per step. `enabled=False` on all but the main process."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def append(self, row: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, row)
