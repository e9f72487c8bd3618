"""PNG plots of a training run: the curves, the expert-load heatmap and R1-Zero's accuracy and length.

    rows = read_metrics("runs/tiny/metrics.jsonl")
    plot_curves(rows, "runs/tiny/curves.png")
    plot_expert_load(loads, ["1", "2", "3 (MTP)"], "runs/tiny/expert_load.png")   # loads [L, E]
    plot_r1_zero(read_metrics("runs/demo/r1_zero/metrics.jsonl"), "runs/demo/r1_zero/r1_zero.png")
    plot_grpo(read_metrics("runs/grpo/metrics.jsonl"), "runs/grpo/grpo.png")     # every GRPO run's panels
    save_png(fig, "runs/tiny/other.png")             # any matplotlib Figure: how every PNG is written

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global
backend switch), so plotting works on headless machines and inside other programs.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .hf.fsutil import atomic_write_bytes


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Draw `fig` on an Agg canvas and write it to `path` as PNG, atomically (folders created)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_curves(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (and MTP loss), learning rate, gradient norm, tokens/s and per-layer max/mean expert load."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    steps = [r["step"] for r in rows]

    def curve(ax, key, label=None, **kw):
        pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label or key, **kw)

    curve(axes[0], "loss", "next-token loss")
    curve(axes[0], "mtp_loss", "MTP loss", alpha=0.8)
    axes[0].set_yscale("log")
    axes[0].legend()
    for ax, key in zip(axes[1:4], ("lr", "grad_norm", "tokens_per_s")):
        curve(ax, key)
        ax.set_title(key)
    curve(axes[4], "mfu")
    axes[4].set_title("MFU")
    layers = sorted({k for r in rows for k in (r.get("expert_load_max_mean") or {})}, key=int)
    for lid in layers:
        pts = [(s, r["expert_load_max_mean"][lid]) for s, r in zip(steps, rows)
               if lid in (r.get("expert_load_max_mean") or {})]
        axes[5].plot(*zip(*pts), label=f"layer {lid}")
    axes[5].axhline(1.0, color="gray", lw=0.8, ls="--")
    axes[5].set_title("expert load max/mean (1 = balanced)")
    if layers:
        axes[5].legend(fontsize="small")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].set_title(title or "loss")
    return save_png(fig, path)


def plot_expert_load(loads, layer_labels: list, path: str | os.PathLike, title: str = "") -> Path:
    """Heatmap: rows are MoE layers, columns experts, colour the load over the layer's mean load."""
    import torch

    loads = torch.as_tensor(loads, dtype=torch.float32)
    rel = loads / loads.mean(-1, keepdim=True).clamp(min=1e-9)
    L, E = rel.shape
    fig = Figure(figsize=(max(5, 0.25 * E + 2), max(2.5, 0.4 * L + 1.5)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(rel.max())))
    ax.set_yticks(range(L), [str(i) for i in layer_labels])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_title(title or "expert load / mean load")
    fig.colorbar(im, ax=ax, label="load / mean")
    return save_png(fig, path)


def _moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what there is)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / len(values[max(0, i + 1 - window):i + 1])
            for i in range(len(values))]


def plot_r1_zero(rows: list[dict], path: str | os.PathLike, window: int = 5) -> Path:
    """R1-Zero's Figure 3 in miniature: training accuracy (sampled) and mean response length over the
    GRPO steps of a run from a base model, each step thin and a `window`-step trailing mean thick."""
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "accuracy", "training accuracy (sampled, T=1)"),
                           (axes[1], "response_length", "mean response length (tokens)")):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, lw=0.8, alpha=0.4, color="C0")
            ax.plot(steps, _moving_mean(list(values), window), lw=2, color="C0", label=f"{window}-step mean")
            ax.legend(fontsize="small")
        ax.set_title(f"R1-Zero (GRPO from the base): {title}", fontsize="medium")
        ax.set_xlabel("GRPO step")
    return save_png(fig, path)


def plot_grpo(rows: list[dict], path: str | Path) -> Path:
    """Reward and held-out pass@1, response length, KL, clip fraction and entropy, signal rates, tokens/s."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    panels = [("reward and accuracy", ["reward_mean", "accuracy", "eval/pass@1"]),
              ("response length (tokens)", ["response_length"]), ("KL to reference (k3)", ["kl"]),
              ("clip fraction, entropy", ["clip_fraction", "entropy"]),
              ("signal", ["no_signal_groups", "dynamic/zero_signal_rate", "truncation_rate", "unparseable_rate"]),
              ("rollout tokens/s", ["rollout_tokens_per_s"])]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("eval/") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize="small")
    return save_png(fig, path)
