"""The training loop shared by pretraining and SFT, readable top to bottom.

    rows = pack_documents(token_lists, seq_len=256)          # input_ids / doc_ids / targets [R, T]
    train(model, rows, TrainConfig(steps=500), "runs/tiny", tokenizer=tok)

One optimizer step:
  1. take this step's rows (a seeded permutation per epoch: batches are a function of the step)
     and this process's share of them, split into micro-batches;
  2. per micro-batch, under bf16 autocast if asked: forward_train -> next-token CE + λ·MTP loss
     (+ α·sequence-wise balance loss), each normalised by its count over the *global* batch,
     so accumulation and data parallelism give exactly the one-big-batch gradient; backward;
  3. clip the gradient norm, set the scheduled LR, AdamW step;
  4. nudge every gate's balancing bias toward its under-loaded experts (loads summed over
     micro-batches and processes);
  5. log a metrics.jsonl row (loss, mtp_loss, lr, grad_norm, tokens/s, MFU, expert load
     max/mean per layer), warn on router collapse, checkpoint every `checkpoint_every` steps.
At the end: a checkpoint, curves.png and expert_load.png.

MFU = achieved FLOP/s / the machine's best measured matmul peak (bf16 with autocast, else fp32;
kept across runs, see matmul_peak_flops),
with training FLOPs per token = 6·N_active + 6·L·H·(d_qk + d_v)·T: N_active counts the weights
one token multiplies (K of E routed experts, lm_head once more per MTP depth, no embedding
lookup); the second term is attention's QKᵀ and AV over the full T×T square (PaLM's convention).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..hf.fsutil import atomic_write_text
from ..model import document_mask
from ..plots import plot_curves, plot_expert_load, read_metrics
from .balance import CollapseMonitor, load_max_over_mean, moe_layer_ids, step_loads, update_expert_bias
from .distributed import DistEnv, all_reduce_sum, barrier, data_parallel
from .loss import IGNORE, linear_cross_entropy, mtp_loss, mtp_targets, sequence_balance_loss
from .optim import build_adamw, set_lr, warmup_cosine, warmup_stable_decay
from .state import TRAIN_STATE, load_train_state, save_checkpoint, truncate_metrics


def opt(default, help: str, **kw):
    """A config field with its help text: the one place a training option is documented (CLI too)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """What the loop does; every field is also a CLI flag (--batch-size, --no-bf16, ...)."""

    steps: int = opt(1000, "optimizer steps: the schedule's length")
    batch_size: int = opt(32, "rows (sequences) per optimizer step, over all processes")
    micro_batch_size: int = opt(8, "rows per forward/backward per process; the rest is gradient accumulation")
    lr: float = opt(3e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = opt(50, "linear warmup steps")
    schedule: str = opt("cosine", "learning-rate schedule after warmup", choices=("cosine", "wsd"))
    decay_fraction: float = opt(0.2, "wsd only: the final fraction of steps that decays the rate")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    bf16: bool = opt(False, "bf16 autocast for the forward pass (weights and optimizer stay fp32)")
    activation_checkpointing: bool = opt(False, "recompute each block in backward to save memory")
    mtp_weight: float = opt(0.3, "λ: weight of the multi-token-prediction loss (DeepSeek-V3: 0.3, later 0.1)")
    bias_update_speed: float = opt(1e-3, "γ: aux-loss-free balancing bias step per optimizer step (0 disables)")
    balance_loss_alpha: float = opt(1e-4, "α: weight of the sequence-wise balance loss (0 disables)")
    seed: int = opt(0, "seed for weights and data order")
    checkpoint_every: int = opt(0, "also checkpoint every N steps (0 = only at the end)")
    stop_at: int | None = opt(None, "stop (with a checkpoint) after this step without finishing the schedule")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size", "micro_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.batch_size % self.micro_batch_size:
            bad("batch_size", f"must be a multiple of micro_batch_size={self.micro_batch_size}")
        if not self.lr > 0:
            bad("lr", "must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be between 0 and 1")
        if self.schedule not in ("cosine", "wsd"):
            bad("schedule", "expected 'cosine' or 'wsd'")
        if not 0 < self.decay_fraction <= 1:
            bad("decay_fraction", "must be in (0, 1]")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "mtp_weight", "bias_update_speed",
                     "balance_loss_alpha", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            bad("stop_at", f"must be between 1 and steps={self.steps}")

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based optimizer step `step`."""
        if self.schedule == "wsd":
            return self.lr * warmup_stable_decay(step, self.steps, self.warmup_steps, self.min_lr_ratio,
                                                 self.decay_fraction)
        return self.lr * warmup_cosine(step, self.steps, self.warmup_steps, self.min_lr_ratio)


# ----------------------------------------------------------------------------- config <-> CLI

def add_config_args(parser, cls, skip: tuple[str, ...] = (), defaults=None) -> None:
    """One --flag per dataclass field, help text and defaults taken from the field (or from the
    instance `defaults`, for a command whose defaults differ, e.g. SFT's shorter schedule)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag, typ = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if defaults is not None:
            default = getattr(defaults, f.name)
        shown = f" (default: {default})" if default is not None else ""
        kw = {"help": f.metadata["help"] + shown, "dest": f.name, "default": default,
              **({"required": True} if f.metadata.get("required") else {})}
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # X | None -> X
        if f.metadata.get("nargs"):
            kw["nargs"] = f.metadata["nargs"]
        parser.add_argument(flag, type=base, choices=f.metadata.get("choices"), **kw)


def config_from_args(cls, args, **overrides):
    """Build a config dataclass from parsed args (fields the parser lacks keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


# ----------------------------------------------------------------------------- batches

def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each packed document starts: doc_ids [B, T] -> [B, T]."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor | None:
    """None (plain causal, the fast path) when every row is one document, else the document mask."""
    if bool((doc_ids == doc_ids[:, :1]).all()):
        return None
    return document_mask(doc_ids)


class RowSampler:
    """Which rows each optimizer step trains on: a seeded permutation per epoch, a pure function
    of (step, seed), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_rows, generator=g)}  # keep one epoch
        return self._perms[epoch]

    def rows(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._perm(int(p) // self.num_rows)[int(p) % self.num_rows] for p in pos])


def check_rows(rows, vocab_size: int) -> None:
    """Clear errors for data the loop cannot train on."""
    for name in ("input_ids", "doc_ids", "targets"):
        t = getattr(rows, name, None)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"training rows: {name} must be a 2-D tensor [rows, seq_len]")
        if t.shape != rows.input_ids.shape:
            raise ValueError(f"training rows: {name} has shape {tuple(t.shape)}, input_ids {tuple(rows.input_ids.shape)}")
    if rows.input_ids.shape[0] == 0:
        raise ValueError("training rows: no data (0 rows after packing)")
    hi = int(rows.input_ids.max())
    if hi >= vocab_size or int(rows.input_ids.min()) < 0:
        raise ValueError(f"training rows: token id {hi} is outside the model's vocab_size={vocab_size}")
    if not bool((rows.targets != IGNORE).any()):
        raise ValueError("training rows: every target is masked (-100): nothing to learn from")


# ----------------------------------------------------------------------------- model plumbing

class TrainForward(nn.Module):
    """forward_train + the main head's loss as one module, so DDP sees (and syncs) a plain forward.

    The head and cross-entropy are fused (loss.linear_cross_entropy): the [B, T, V] logits are
    never stored for backward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, mask, targets, num_tokens):
        hidden, mtp_logits = self.model.forward_train(input_ids, positions, mask)
        return linear_cross_entropy(hidden, self.model.lm_head.weight, targets, num_tokens), mtp_logits


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block (MTP blocks too) during backward instead of storing its
    activations. Applied from outside: each block's forward is wrapped, its weights keep their names."""
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6·N_active + 6·L·H·(d_qk + d_v)·T: see the module docstring."""
    cfg = model.config
    n = model.num_params(active=True, include_mtp=True)
    if not cfg.tie_word_embeddings:
        n -= model.model.embed_tokens.weight.numel()  # a lookup, not a matmul
    n += cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # lm_head again per MTP depth
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attn = 6 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6.0 * n + attn


def _measure_matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Dense square-matmul FLOP/s now: the best of several short trials."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(5):
        sync()
        iters, t0 = 0, time.perf_counter()
        while iters < 2 or time.perf_counter() - t0 < 0.08:
            a @ b
            iters += 1
        sync()
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


def _machine_key(device: str, dtype: torch.dtype) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        cpuinfo = Path("/proc/cpuinfo")
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
        name = f"{found.group(1).strip() if found else platform.processor()} x{torch.get_num_threads()} threads"
    return f"{name} {str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """This machine's dense matmul FLOP/s: the highest ever measured here.

    A measurement taken while other work shares the machine comes out low, and MFU against it
    high (over 100% on a busy 2-core box). So the best figure per device, thread count and dtype
    is kept in ``$XDG_CACHE_HOME/nanoseek/matmul_peak.json`` and only ever raised.
    """
    key = _machine_key(device, dtype)
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoseek" / "matmul_peak.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    measured = _measure_matmul_flops(device, dtype)
    if measured > known.get(key, 0.0):
        known[key] = measured
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(known, indent=1) + "\n")
        except OSError:  # a read-only home: the figure is still right for this process
            pass
    return max(measured, known.get(key, 0.0))


# ----------------------------------------------------------------------------- the loop

def train(model: nn.Module, rows, cfg: TrainConfig, out_dir: str | Path, tokenizer=None, stage: str = "pretrain",
          meta: dict | None = None, resume: bool = False, env: DistEnv | None = None) -> Path:
    """Train `model` on packed `rows` (input_ids, doc_ids, targets [R, T]) and return out_dir.

    resume: continue from out_dir's training state; the caller passes the model loaded from
    out_dir (``load_pretrained(out_dir)``). `meta` is stored in train_state/state.json.
    """
    env = env or DistEnv()
    out_dir = Path(out_dir)
    check_rows(rows, model.config.vocab_size)
    if cfg.batch_size % (cfg.micro_batch_size * env.world_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size × processes "
                         f"= {cfg.micro_batch_size} × {env.world_size}")
    model.to(env.device).train()
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay)
    start = _start_step(out_dir, model, optimizer, cfg, resume, env)
    end = cfg.stop_at or cfg.steps
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    forward = data_parallel(TrainForward(model), env)
    sampler = RowSampler(rows.input_ids.shape[0], cfg.batch_size, cfg.seed)
    seq_len = rows.input_ids.shape[1]
    tokens_per_step = cfg.batch_size * seq_len
    peak = matmul_peak_flops(str(env.device), torch.bfloat16 if cfg.bf16 else torch.float32) * env.world_size
    flops_per_token = training_flops_per_token(model, seq_len)
    layer_ids = moe_layer_ids(model)
    monitor = CollapseMonitor(layer_ids)
    recent_loads = collections.deque(maxlen=max(1, cfg.steps // 10))
    meta = {"stage": stage, **(meta or {}), "train_config": dataclasses.asdict(cfg)}
    if env.is_main:
        print(f"{stage}: {model.num_params():,} parameters ({model.num_params(active=True):,} active), "
              f"{rows.input_ids.shape[0]:,} rows of {seq_len} tokens, {tokens_per_step:,} tokens/step, "
              f"{env.world_size} process(es) on {env.device}, steps {start}->{end} of {cfg.steps}")
    bar = tqdm(total=end, initial=start, disable=not (env.is_main and cfg.progress), unit="step",
               dynamic_ncols=True, desc=stage)
    t_start, row = time.perf_counter(), None
    for step in range(start, end):
        t0 = time.perf_counter()
        losses, loads = train_step(forward, model, optimizer, rows, sampler.rows(step), step, cfg, env)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        recent_loads.append(loads)
        collapsed = monitor.update(step + 1, loads) if env.is_main else []
        row = {"step": step + 1, **losses, "tokens": (step + 1) * tokens_per_step,
               "tokens_per_s": tokens_per_step / dt, "mfu": flops_per_token * tokens_per_step / dt / peak,
               "elapsed_s": time.perf_counter() - t_start,
               "expert_load_max_mean": {str(i): round(r, 4) for i, r in zip(layer_ids, load_max_over_mean(loads).tolist())},
               "expert_load": {str(i): load.tolist() for i, load in zip(layer_ids, loads)},
               "collapsed_layers": collapsed}
        if env.is_main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", mfu=f"{row['mfu']:.1%}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < end:
            _checkpoint(out_dir, model, optimizer, tokenizer, step + 1, meta, cfg, env)
    bar.close()
    if start < end:
        _checkpoint(out_dir, model, optimizer, tokenizer, end, meta, cfg, env)
    if env.is_main:
        _finish(out_dir, stage, row, recent_loads, layer_ids, model.config.num_hidden_layers)
    return out_dir


def train_step(forward: nn.Module, model: nn.Module, optimizer, rows, row_ids: torch.Tensor, step: int,
               cfg: TrainConfig, env: DistEnv) -> tuple[dict, torch.Tensor]:
    """One optimizer step over this process's share of `row_ids`: (logged losses, expert loads [L, E])."""
    mine = row_ids.view(env.world_size, -1)[env.rank]
    input_ids, doc_ids, targets = (getattr(rows, n)[mine].to(env.device) for n in ("input_ids", "doc_ids", "targets"))
    deep_targets = [mtp_targets(targets, doc_ids, k) for k in range(1, len(model.mtp_layers) + 1)]
    # Normalisers over the global batch: scored tokens per objective (next token, each MTP depth).
    counts = torch.stack([(t != IGNORE).sum() for t in [targets] + deep_targets]).double()
    counts = all_reduce_sum(counts.to(env.device), env).tolist()
    sums, loads = torch.zeros(3, dtype=torch.float64), 0
    starts = range(0, len(mine), cfg.micro_batch_size)
    for i, a in enumerate(starts):
        sl = slice(a, a + cfg.micro_batch_size)
        last = i == len(starts) - 1
        with forward.no_sync() if env.distributed and not last else contextlib.nullcontext():
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                ce, mtp_logits = forward(input_ids[sl], document_positions(doc_ids[sl]), attention_mask(doc_ids[sl]),
                                         targets[sl], counts[0])
            mtp = mtp_loss(mtp_logits, [t[sl] for t in deep_targets], counts[1:]).to(ce.device)
            bal = torch.zeros((), device=ce.device)
            real = doc_ids[sl] >= 0  # padding (doc id -1) is routed but neither balanced nor counted
            if cfg.balance_loss_alpha > 0:
                bal = sum(sequence_balance_loss(moe.scores, moe.indices, real, num_sequences=cfg.batch_size)
                          for moe in model.moe_layers())
            loss = ce + cfg.mtp_weight * mtp + cfg.balance_loss_alpha * bal
            # DDP averages gradients over processes; each loss is already a share of the global sum.
            (loss * env.world_size).backward()
        sums += torch.stack([ce.detach(), mtp.detach(), bal.detach()]).double().cpu()
        loads = loads + step_loads(model, real)
    sums = all_reduce_sum(sums.to(env.device), env).cpu()
    loads = all_reduce_sum(torch.as_tensor(loads).to(env.device), env).cpu()
    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
    if not (math.isfinite(grad_norm) and math.isfinite(float(sums[0]))):
        raise FloatingPointError(f"step {step + 1}: loss {float(sums[0])} / gradient norm {grad_norm} is not "
                                 f"finite; try a lower --lr or --grad-clip")
    lr = cfg.lr_at(step)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_expert_bias(model, loads, cfg.bias_update_speed)
    mtp_value = float(sums[1]) if model.mtp_layers else None
    return {"loss": float(sums[0]), "mtp_loss": mtp_value, "balance_loss": float(sums[2]), "lr": lr,
            "grad_norm": grad_norm}, loads


def _start_step(out_dir: Path, model, optimizer, cfg: TrainConfig, resume: bool, env: DistEnv) -> int:
    """0 for a fresh run; the checkpointed step (optimizer and RNG restored) when resuming."""
    if resume:
        state = load_train_state(out_dir, model, optimizer)
        saved = state.get("train_config", {})
        for name in ("batch_size", "seed"):
            if saved.get(name) != getattr(cfg, name):
                raise ValueError(f"{out_dir}: cannot resume with {name}={getattr(cfg, name)}; the run used "
                                 f"{name}={saved.get(name)} (the data order depends on it)")
        if env.is_main:
            truncate_metrics(out_dir / "metrics.jsonl", state["step"])
        barrier(env)
        return int(state["step"])
    if (out_dir / TRAIN_STATE).exists():
        raise ValueError(f"{out_dir} already holds a training run; pass --resume to continue it or choose "
                         "another --out")
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # from a run that died before its first checkpoint
    barrier(env)
    return 0


def _checkpoint(out_dir, model, optimizer, tokenizer, step, meta, cfg, env) -> None:
    if env.is_main:
        save_checkpoint(out_dir, model, optimizer, step, tokenizer,
                        {**meta, "data": {"rows_seen": step * cfg.batch_size}})
    barrier(env)


def _finish(out_dir: Path, stage: str, row: dict | None, recent_loads, layer_ids: list[int],
            num_hidden_layers: int) -> None:
    """Plots and a one-line summary once the run ends."""
    plot_curves(read_metrics(out_dir / "metrics.jsonl"), out_dir / "curves.png", title=f"{stage}: loss")
    if layer_ids and recent_loads:
        labels = [f"{i} (MTP)" if i >= num_hidden_layers else str(i) for i in layer_ids]
        plot_expert_load(sum(recent_loads), labels, out_dir / "expert_load.png",
                         title=f"{stage}: expert load / mean, last {len(recent_loads)} steps")
    if row is not None:
        print(f"{stage}: step {row['step']}, loss {row['loss']:.4f}"
              + (f", mtp_loss {row['mtp_loss']:.4f}" if row.get("mtp_loss") is not None else "")
              + f", {row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}; checkpoint in {out_dir}")
