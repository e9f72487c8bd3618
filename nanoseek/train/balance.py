"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2) and router health.

Each MoE gate carries a bias b_i that is added to the scores when experts are chosen (never
to the weights). After every optimizer step the trainer nudges it toward the under-loaded:

    b_i += γ · sign(mean_j load_j − load_i)        γ = 0.001 in DeepSeek-V3; 0 disables

    loads = step_loads(model)                      # [L, E] tokens per expert, after a forward
    update_expert_bias(model, loads, gamma=1e-3)   # after optimizer.step()
    load_max_over_mean(loads)                      # [L]: 1.0 is perfectly balanced
    monitor = CollapseMonitor(); monitor.update(step, loads)   # warns on router collapse

Router collapse - a layer sending (nearly) every token to the same few experts - is silent:
the loss still falls. CollapseMonitor makes it loud.
"""

from __future__ import annotations

import warnings

import torch


class RouterCollapseWarning(UserWarning):
    """A MoE layer routes (almost) all tokens to a few experts."""


def step_loads(model, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens each routed expert received in the last forward: [L, E] (int64), one row per MoE layer.

    valid [B, T] bool: count only these tokens (not padding); needs the routing choices that
    MoE layers keep in training mode.
    """
    moes = model.moe_layers()
    if not moes:
        return torch.zeros(0, 0, dtype=torch.long)
    if valid is None:
        return torch.stack([moe.load.detach().to("cpu", torch.long) for moe in moes])
    n_experts = moes[0].gate.weight.shape[0]
    return torch.stack([torch.bincount(moe.indices[valid].flatten(), minlength=n_experts).cpu() for moe in moes])


def moe_layer_ids(model) -> list[int]:
    """The layer index of each MoE layer (MTP layers included), in `step_loads` row order."""
    return [i for i, layer in enumerate(model.model.layers) if layer.mlp in model.moe_layers()]


@torch.no_grad()
def update_expert_bias(model, loads: torch.Tensor, gamma: float) -> None:
    """b_i += γ · sign(mean load − load_i) for every MoE layer with a balancing bias.

    loads [L, E]: tokens per expert over the whole optimizer step (all micro-batches, all
    processes), so every process applies the same update.
    """
    if gamma == 0:
        return
    for moe, load in zip(model.moe_layers(), loads):
        bias = moe.gate.e_score_correction_bias
        if bias is None:  # greedy / group-limited routing (V2) has no bias
            continue
        load = load.to(bias.device, torch.float32)
        bias += gamma * torch.sign(load.mean() - load)


def load_max_over_mean(loads: torch.Tensor) -> torch.Tensor:
    """Per layer: the busiest expert's load over the mean load ([L] floats; 1 = balanced, E/K = collapsed)."""
    loads = loads.float()
    return loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)


class CollapseMonitor:
    """Warns when a layer routes almost everything to a few experts.

    Over the last `window` steps, an expert is starved when it got less than
    `starved_share` of its fair share (mean load); a layer has collapsed when at least
    `collapsed_fraction` of its experts are starved. Warns once per layer per episode.
    """

    def __init__(self, layer_ids: list[int], window: int = 20, starved_share: float = 0.1,
                 collapsed_fraction: float = 0.5):
        self.layer_ids, self.window = layer_ids, window
        self.starved_share, self.collapsed_fraction = starved_share, collapsed_fraction
        self.history: list[torch.Tensor] = []
        self.collapsed: set[int] = set()

    def update(self, step: int, loads: torch.Tensor) -> list[int]:
        """Record one step's loads [L, E]; return the layer ids collapsed now (and warn on new ones)."""
        if loads.numel() == 0:
            return []
        self.history = (self.history + [loads.float()])[-self.window:]
        total = torch.stack(self.history).sum(0)  # [L, E]
        fair = total.mean(-1, keepdim=True)
        starved = (total < self.starved_share * fair).float().mean(-1)  # [L]: share of starved experts
        now = {lid for lid, frac in zip(self.layer_ids, starved.tolist()) if frac >= self.collapsed_fraction}
        ratio = load_max_over_mean(total)
        for row, lid in enumerate(self.layer_ids):
            if lid in now and lid not in self.collapsed:
                n_starved = int(round(float(starved[row]) * total.shape[1]))
                warnings.warn(
                    f"step {step}: router collapse in layer {lid}: {n_starved} of {total.shape[1]} experts got "
                    f"< {self.starved_share:.0%} of their fair share over the last {len(self.history)} steps "
                    f"(max/mean load {float(ratio[row]):.2f}); consider a larger --bias-update-speed or "
                    f"--balance-loss-alpha", RouterCollapseWarning, stacklevel=2)
        self.collapsed = now
        return sorted(now)
