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

The pieces live beside it: batches.py (row order, positions, masks), losses.py, balance.py,
step.py (the optimizer step and metrics log every loop shares), flops.py (FLOPs per token, MFU).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from ..indexer import STAGES, Indexer, indexer_loss, set_stage
from ..model import add_indexers
from ..plots import plot_curves, plot_expert_load, read_metrics
from .balance import CollapseMonitor, load_max_over_mean, moe_layer_ids, step_loads, update_expert_bias
from .batches import RowSampler, attention_mask, check_rows, document_positions
from .distributed import DistEnv, all_reduce_sum, barrier
from .flops import matmul_peak_flops, mfu, training_flops_per_token
from .losses import IGNORE, linear_cross_entropy, mtp_loss, mtp_targets, sequence_balance_loss
from .optim import build_adamw, warmup_cosine, warmup_stable_decay
from .parallelize import Layout, Meshes, clip_grad_norm, parallelize
from .state import load_run_state, refuse_existing_run, save_run_checkpoint, start_fresh, truncate_metrics
from .step import MetricsLog, optimizer_step


def opt(default, help: str, **kw):
    """A config field with its help text: the one place a training option is documented. The command
    layer (nanoseek.cli.flags) turns each field with help into a --flag."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Parallelism:
    """How several processes (torchrun) split a training run (parallelize.py): every loop's config
    (TrainConfig, GRPOConfig) inherits these flags, so they are documented once."""

    fsdp: bool = opt(True, "several processes: shard weights, gradients and AdamW state (FSDP2); "
                     "--no-fsdp replicates them (dp_replicate = world)")
    dp_shard: int = opt(-1, "processes each weight is sharded over (-1: world / dp_replicate)")
    dp_replicate: int = opt(1, "replica groups (HSDP when > 1 and dp_shard > 1)")
    ep: int = opt(1, "expert parallelism: split each layer's routed experts over this many processes")


@dataclass
class TrainConfig(Parallelism):
    """What the loop does; every field is also a CLI flag (--batch-size, --no-bf16, ...), the
    parallel layout's (Parallelism) included."""

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
    indexer_stage: str | None = opt(None, "DeepSeek-V3.2 DSA training of the lightning indexers: 'warmup' trains only "
                                          "them, toward the dense attention (KL, eq. 3); 'sparse' trains everything "
                                          "with top-k attention, the indexers by their KL alone (eq. 4)",
                                    choices=STAGES)
    index_topk: int = opt(2048, "a DeepSeek-V3 model trained with --indexer-stage becomes a V3.2 one with fresh "
                                "lightning indexers choosing this many tokens (V3.2 itself: 2048)")
    index_n_heads: int = opt(64, "those indexers' heads")
    index_head_dim: int = opt(128, "those indexers' query/key size")
    compile: bool = opt(False, "torch.compile each transformer block")
    fp8: bool = opt(False, "FP8 linear layers in the blocks (torchao float8, rowwise scaling; CUDA sm89+)")

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size", "micro_batch_size", "dp_replicate", "ep"):
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
        if self.indexer_stage not in (None, *STAGES):
            bad("indexer_stage", f"expected one of {', '.join(STAGES)}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            bad("stop_at", f"must be between 1 and steps={self.steps}")

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based optimizer step `step`."""
        if self.schedule == "wsd":
            return self.lr * warmup_stable_decay(step, self.steps, self.warmup_steps, self.min_lr_ratio,
                                                 self.decay_fraction)
        return self.lr * warmup_cosine(step, self.steps, self.warmup_steps, self.min_lr_ratio)


# ----------------------------------------------------------------------------- model plumbing

class TrainForward(nn.Module):
    """forward_train + the main head's loss as one module, so FSDP2 (the root unit) sees a plain forward.

    The head and cross-entropy are fused (losses.linear_cross_entropy): the [B, T, V] logits are
    never stored for backward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, mask, targets, num_tokens):
        hidden, mtp_logits = self.model.forward_train(input_ids, positions, mask)
        return linear_cross_entropy(hidden, self.model.lm_head.weight, targets, num_tokens), mtp_logits


# ----------------------------------------------------------------------------- the loop

def with_indexers(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model --indexer-stage trains: a V3.2 model as it is, a V3 one continued as V3.2 with fresh
    indexers of cfg's shape (``model.add_indexers``), as DeepSeek continued V3.1 into V3.2."""
    if cfg.indexer_stage is None or model.config.has_indexer:
        return model
    return add_indexers(model, cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim, cfg.seed)


def train(model: nn.Module, rows, cfg: TrainConfig, out_dir: str | Path, tokenizer=None, stage: str = "pretrain",
          meta: dict | None = None, resume: bool = False, env: DistEnv | None = None) -> Path:
    """Train `model` on packed `rows` (input_ids, doc_ids, targets [R, T]) and return out_dir.

    resume: continue from out_dir's training state; the caller passes the model loaded from
    out_dir (``load_pretrained(out_dir)``). `meta` is stored in train_state/state.json.
    A little over 60 lines because it reads as the loop's whole life in order: checks, parallel
    layout, resume, the step loop with its logging and checkpoints, the final save.
    """
    env = env or DistEnv()
    out_dir = Path(out_dir)
    check_rows(rows, model.config.vocab_size)
    if cfg.batch_size % (cfg.micro_batch_size * env.world_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size × processes "
                         f"= {cfg.micro_batch_size} × {env.world_size}")
    model.to(env.device).train()
    if cfg.indexer_stage:  # before the optimizer: the warm-up freezes all but the indexers
        set_stage(model, cfg.indexer_stage)
    n_params, n_active = model.num_params(), model.num_params(active=True)
    flops_per_token = training_flops_per_token(model, rows.input_ids.shape[1])
    forward, meshes = parallelize(TrainForward(model), layout_of(cfg, env), env.device.type, bf16=cfg.bf16,
                                  activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                  fp8=cfg.fp8)
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay)
    start = _start_step(out_dir, model, optimizer, cfg, resume, env, meshes)
    end = cfg.stop_at or cfg.steps
    sampler = RowSampler(rows.input_ids.shape[0], cfg.batch_size, cfg.seed)
    seq_len = rows.input_ids.shape[1]
    tokens_per_step = cfg.batch_size * seq_len
    peak = matmul_peak_flops(str(env.device), torch.bfloat16 if cfg.bf16 else torch.float32) * env.world_size
    layer_ids = moe_layer_ids(model)
    monitor = CollapseMonitor(layer_ids)
    recent_loads = collections.deque(maxlen=max(1, cfg.steps // 10))
    meta = {"stage": stage, **(meta or {}), "train_config": dataclasses.asdict(cfg)}
    if env.is_main:
        print(f"{stage}: {n_params:,} parameters ({n_active:,} active), "
              f"{rows.input_ids.shape[0]:,} rows of {seq_len} tokens, {tokens_per_step:,} tokens/step, "
              f"{env.world_size} process(es) on {env.device}{_describe(meshes)}, steps {start}->{end} of {cfg.steps}")
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=env.is_main)
    bar = tqdm(total=end, initial=start, disable=not (env.is_main and cfg.progress), unit="step",
               dynamic_ncols=True, desc=stage)
    t_start, row = time.perf_counter(), None
    for step in range(start, end):
        t0 = time.perf_counter()
        losses, loads = train_step(forward, model, optimizer, rows, sampler.rows(step), step, cfg, env, meshes)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        recent_loads.append(loads)
        collapsed = monitor.update(step + 1, loads) if env.is_main else []
        row = {"step": step + 1, **losses, "tokens": (step + 1) * tokens_per_step,
               "tokens_per_s": tokens_per_step / dt, "mfu": mfu(flops_per_token, tokens_per_step, dt, peak),
               "elapsed_s": time.perf_counter() - t_start, **_expert_fields(layer_ids, loads, collapsed)}
        log.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", mfu=f"{row['mfu']:.1%}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < end:
            _checkpoint(out_dir, model, optimizer, tokenizer, step + 1, meta, cfg, env, meshes)
    bar.close()
    if start < end:
        _checkpoint(out_dir, model, optimizer, tokenizer, end, meta, cfg, env, meshes)
    if env.is_main:
        _finish(out_dir, stage, row, recent_loads, layer_ids, model.config.num_hidden_layers)
    return out_dir


def _expert_fields(layer_ids: list[int], loads: torch.Tensor, collapsed: list) -> dict:
    """A metrics row's expert-load fields: max/mean load per MoE layer, the loads, collapsed layers
    (none for a dense model)."""
    if not layer_ids:
        return {}
    return {"expert_load_max_mean": {str(i): round(r, 4) for i, r in zip(layer_ids, load_max_over_mean(loads).tolist())},
            "expert_load": {str(i): load.tolist() for i, load in zip(layer_ids, loads)},
            "collapsed_layers": collapsed}


def train_step(forward: nn.Module, model: nn.Module, optimizer, rows, row_ids: torch.Tensor, step: int,
               cfg: TrainConfig, env: DistEnv, meshes: Meshes | None = None) -> tuple[dict, torch.Tensor]:
    """One optimizer step over this process's share of `row_ids`: (logged losses, expert loads [L, E])."""
    mine = row_ids.view(env.world_size, -1)[env.rank]
    input_ids, doc_ids, targets = (getattr(rows, n)[mine].to(env.device) for n in ("input_ids", "doc_ids", "targets"))
    deep_targets = [mtp_targets(targets, doc_ids, k) for k in range(1, len(model.mtp_layers) + 1)]
    # Normalisers over the global batch: scored tokens per objective (next token, each MTP depth).
    counts = torch.stack([(t != IGNORE).sum() for t in [targets] + deep_targets]).double()
    counts = all_reduce_sum(counts.to(env.device), env).tolist()
    sums, loads = torch.zeros(4, dtype=torch.float64), 0
    indexers = [m for m in model.modules() if isinstance(m, Indexer) and m.stage]
    starts = range(0, len(mine), cfg.micro_batch_size)
    for i, a in enumerate(starts):
        sl = slice(a, a + cfg.micro_batch_size)
        last = i == len(starts) - 1
        if isinstance(forward, FSDPModule):  # reduce gradients after the last micro-batch only
            forward.set_requires_gradient_sync(last)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            ce, mtp_logits = forward(input_ids[sl], document_positions(doc_ids[sl]), attention_mask(doc_ids[sl]),
                                     targets[sl], counts[0])
        mtp = mtp_loss(mtp_logits, [t[sl] for t in deep_targets], counts[1:]).to(ce.device)
        bal = torch.zeros((), device=ce.device)
        real = doc_ids[sl] >= 0  # padding (doc id -1) is routed but neither balanced nor counted
        if cfg.balance_loss_alpha > 0:
            bal = sum((sequence_balance_loss(moe.scores, moe.indices, real, num_sequences=cfg.batch_size)
                       for moe in model.moe_layers()), bal)  # a dense model's stays the zero tensor
        # DSA: the indexers' KL (eq. 3/4), a mean over queries per micro-batch weighted by its rows
        kl = indexer_loss(indexers) if indexers else None
        kl = torch.zeros((), device=ce.device) if kl is None else kl
        loss = ce + cfg.mtp_weight * mtp + cfg.balance_loss_alpha * bal + kl * len(mine[sl]) / cfg.batch_size
        # FSDP averages gradients over processes; each loss is already a share of the global sum.
        (loss * env.world_size).backward()
        sums += torch.stack([ce.detach(), mtp.detach(), bal.detach(),
                             kl.detach() * len(mine[sl]) / cfg.batch_size]).double().cpu()
        loads = loads + step_loads(model, real)
    sums = all_reduce_sum(sums.to(env.device), env).cpu()
    loads = all_reduce_sum(torch.as_tensor(loads).to(env.device), env).cpu()
    lr = cfg.lr_at(step)
    clip = None if meshes is None else functools.partial(clip_grad_norm, meshes=meshes)
    grad_norm = optimizer_step(model, optimizer, lr, cfg.grad_clip, loss=float(sums[0]), where=f"step {step + 1}",
                               clip=clip)
    if cfg.indexer_stage != "warmup":  # the warm-up keeps the whole model but the indexers as it was
        update_expert_bias(model, loads, cfg.bias_update_speed)
    mtp_value = float(sums[1]) if model.mtp_layers else None
    out = {"loss": float(sums[0]), "mtp_loss": mtp_value, "balance_loss": float(sums[2]), "lr": lr,
           "grad_norm": grad_norm}
    if indexers:
        out["indexer_loss"] = float(sums[3])
    return out, loads


def layout_of(cfg: Parallelism, env: DistEnv) -> Layout:
    """The parallel layout the flags ask for at this world size (--no-fsdp: replicate everything)."""
    if not cfg.fsdp:
        return Layout.resolve(env.world_size, dp_shard=1, dp_replicate=env.world_size, ep=cfg.ep)
    return Layout.resolve(env.world_size, cfg.dp_shard, cfg.dp_replicate, cfg.ep)


def _describe(meshes: Meshes | None) -> str:
    if meshes is None:
        return ""
    lay = meshes.layout
    return f" (dp_replicate {lay.dp_replicate} × dp_shard {lay.dp_shard}, ep {lay.ep})"


def _start_step(out_dir: Path, model, optimizer, cfg: TrainConfig, resume: bool, env: DistEnv,
                meshes: Meshes | None = None) -> int:
    """0 for a fresh run; the checkpointed step (optimizer and RNG restored) when resuming."""
    if resume:
        state = load_run_state(out_dir, model, optimizer, meshes)  # DCP: any layout, one process included
        saved = state.get("train_config", {})
        for name in ("batch_size", "seed"):
            if saved.get(name) != getattr(cfg, name):
                raise ValueError(f"{out_dir}: cannot resume with {name}={getattr(cfg, name)}; the run used "
                                 f"{name}={saved.get(name)} (the data order depends on it)")
        if env.is_main:
            truncate_metrics(out_dir / "metrics.jsonl", state["step"])
        barrier(env)
        return int(state["step"])
    refuse_existing_run(out_dir)
    if env.is_main:
        start_fresh(out_dir)
    barrier(env)
    return 0


def _checkpoint(out_dir, model, optimizer, tokenizer, step, meta, cfg, env, meshes=None) -> None:
    meta = {**meta, "data": {"rows_seen": step * cfg.batch_size}}
    save_run_checkpoint(out_dir, model, optimizer, step, env, meshes, tokenizer, meta)


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
