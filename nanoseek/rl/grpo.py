"""Reinforcement learning with Group Relative Policy Optimization (command: cli/grpo.py).

    from nanoseek.rl.grpo import GRPOConfig, grpo
    grpo(GRPOConfig(model="runs/sft", out="runs/grpo", steps=60))

One step, readable top to bottom in `grpo_step`:
  1. take `prompts_per_step` training problems (a seeded permutation: batches are a function of
     the step) and render each through the chat template, or pretraining's text layout for
     R1-Zero from a base model (both end in an open <think>);
  2. sample G completions per prompt with nanoseek.inference.Engine over the trainer's own model
     object: the engine holds no copy, so every rollout uses the weights of the last optimizer step;
  3. score every completion with the reward functions (rewards.py) and turn the rewards into
     group-relative advantages (losses.py);
  4. log-probabilities of the sampled tokens under the current policy (pi_old), the frozen
     reference (only when beta > 0: with beta = 0 no reference model is kept) and, as a check,
     the engine's own inference path (latent cache + absorbed attention); the mismatch is logged;
  5. mu optimizer steps on the batch with the variant's loss (GRPO, Dr. GRPO or DAPO), gradient
     clipping and AdamW through the optimizer step every loop shares (nanoseek.train.step);
  6. a metrics.jsonl row: reward mean/std (and per reward), accuracy, response length, KL, clip
     fraction, entropy, no-signal groups, truncation and unparseable-answer rates (with a warning
     when the last three are high), rollout tokens/s; held-out pass@1 (nanoseek.train.evaluate, R1's
     temperature 0.6 / top-p 0.95, averaged over k samples, and maj@k) every `eval_every` steps,
     sample completions every `sample_every` steps, atomic checkpoints, grpo.png at the end.

Simplifications, stated plainly: every prompt of a step has the same G; no dynamic sampling
(DAPO drops no-signal groups; here they are counted and contribute zero advantage); MoE balancing
biases stay as the input model left them (no aux-loss-free update during RL); the MTP module is
not trained by RL; mu > 1 re-uses the whole batch for each of its optimizer steps.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..hf.io import load_pretrained, load_with_tokenizer
from ..data.prompts import LAYOUTS, checkpoint_layout, render_prompt, task_from_spec
from ..data.tasks import TASKS, extract_answer
from ..inference import Engine
from ..plots import read_metrics, save_png
from ..tokenizer import Tokenizer
from ..train.evaluate import evaluate_accuracy
from ..train.batches import RowSampler
from ..train.loop import opt
from ..train.optim import build_adamw
from ..train.state import load_train_state, refuse_existing_run, save_checkpoint, start_fresh, truncate_metrics
from ..train.step import MetricsLog, append_jsonl, optimizer_step
from .losses import (dapo_loss, dr_grpo_advantages, dr_grpo_loss, grpo_advantages, grpo_loss,
                     token_entropy, token_logprobs)
from .rewards import accuracy_reward, parse_rewards, score

# variant -> (advantages, loss). DAPO keeps GRPO's normalised advantages.
VARIANTS = {"grpo": (grpo_advantages, grpo_loss), "dr_grpo": (dr_grpo_advantages, dr_grpo_loss),
            "dapo": (grpo_advantages, dapo_loss)}
# A signal above its threshold gets a warning: the run is probably learning nothing.
WARN_AT = {"no_signal_groups": 0.8, "truncation_rate": 0.3, "unparseable_rate": 0.5}
ADVICE = {"no_signal_groups": "every completion of most prompts scores the same; make problems easier/harder "
                              "or raise --group-size",
          "truncation_rate": "completions hit --max-new-tokens and get no answer; raise it",
          "unparseable_rate": "most completions have no <answer>; start from an SFT model or add a format reward"}


class GRPOSignalWarning(UserWarning):
    """A GRPO step produced little learning signal (see ADVICE)."""


@dataclass
class GRPOConfig:
    """A GRPO run; every field is also a CLI flag."""

    model: str = opt(None, "checkpoint folder to start from (with its tokenizer)", required=True)
    out: str = opt(None, "run folder to write (checkpoint, metrics.jsonl, samples.jsonl, grpo.png)", required=True)
    data: str = opt("arithmetic", f"built-in task ({', '.join(TASKS)}), optionally with settings: "
                                  "arithmetic:max_digits=2,ops=+-")
    layout: str | None = opt(None, "prompt layout: chat (template; R1) or text (pretraining's; R1-Zero from a "
                                   "base); default: text for a pretrain checkpoint, else chat", choices=LAYOUTS)
    reward: list[str] = opt(None, "rewards: built-in accuracy/format/code or package.module:function, "
                                  "optionally =WEIGHT, space-separated (default: accuracy format=0.1)",
                            nargs="+")
    variant: str = opt("grpo", "loss: grpo (DeepSeekMath), dr_grpo (no std, no length normalisation), "
                               "dapo (token-level; pair with --eps-high 0.28 --beta 0)", choices=tuple(VARIANTS))
    steps: int = opt(100, "GRPO steps (each samples a fresh batch)")
    prompts_per_step: int = opt(8, "prompts per step")
    group_size: int = opt(8, "G: completions sampled per prompt")
    max_new_tokens: int = opt(256, "generation budget per completion")
    temperature: float = opt(1.0, "rollout sampling temperature")
    top_p: float | None = opt(None, "rollout nucleus sampling (the loss still uses the full distribution)")
    lr: float = opt(1e-4, "learning rate (constant after warmup)")
    warmup_steps: int = opt(0, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0 = off)")
    beta: float = opt(0.04, "KL coefficient to the frozen reference (DeepSeekMath: 0.04; 0 keeps no reference)")
    eps_low: float = opt(0.2, "clip range below 1 for the probability ratio")
    eps_high: float | None = opt(None, "clip range above 1 (default: eps_low; DAPO's clip-higher: 0.28)")
    mu: int = opt(1, "optimizer steps per sampled batch (GRPO's mu)")
    micro_batch_size: int = opt(16, "completions per forward/backward (gradient accumulation)")
    num_train: int = opt(5000, "training problems to draw prompts from")
    eval_every: int = opt(10, "held-out evaluation every N steps (0 = only at start and end)")
    eval_size: int = opt(100, "held-out problems for pass@1")
    eval_samples: int = opt(1, "k: samples per held-out problem (pass@1 averaged over k, and maj@k)")
    eval_temperature: float = opt(0.6, "held-out sampling temperature (R1's setting)")
    eval_top_p: float = opt(0.95, "held-out nucleus sampling (R1's setting)")
    sample_every: int = opt(10, "write sample completions to samples.jsonl every N steps (0 = never)")
    checkpoint_every: int = opt(0, "also checkpoint every N steps (0 = only at the end)")
    max_minutes: float | None = opt(None, "stop (with a checkpoint) after this much wall-clock training time "
                                          "(held-out evaluations not counted)")
    max_cpu_minutes: float | None = opt(None, "stop after this much CPU time of this process, evaluations not "
                                              "counted: a budget that a shared machine does not stretch")
    seed: int = opt(0, "seed for prompt order and sampling")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: {why}")

        if not self.model or not self.out:
            raise ValueError("GRPOConfig: --model and --out are required")
        task_from_spec(self.data)  # raises, naming the task or setting
        if self.layout is None:
            self.layout = checkpoint_layout(self.model)
        if self.layout not in LAYOUTS:
            bad("layout", f"expected one of {', '.join(LAYOUTS)}")
        if self.variant not in VARIANTS:
            bad("variant", f"expected one of {', '.join(VARIANTS)}")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "micro_batch_size", "num_train",
                     "eval_size", "eval_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.group_size < 2:
            bad("group_size", "GRPO needs at least 2 completions per prompt")
        if self.temperature <= 0 or self.eval_temperature < 0:
            bad("temperature", "rollouts must be sampled (temperature > 0)")
        if not self.lr > 0:
            bad("lr", "must be positive")
        for name in ("beta", "eps_low", "weight_decay", "grad_clip", "warmup_steps", "eval_every",
                     "sample_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.eps_high is not None and self.eps_high < 0:
            bad("eps_high", "must be >= 0")
        self.reward = list(self.reward or ["accuracy", "format=0.1"])
        parse_rewards(self.reward)  # fails early on a bad module path


# ----------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """G completions for each of P prompts, prompt-major: completion i is prompt i // G's."""
    examples: list
    prompt_texts: list[str]
    prompts: list[list[int]]  # [P] token ids, generation prompt included
    completions: list[list[int]]  # [P*G] sampled ids, EOS appended when the model ended the turn
    texts: list[str]  # [P*G] decoded completions (no EOS)
    finish_reasons: list[str]  # [P*G] "stop" or "length"
    seconds: float
    new_tokens: int


def sample_groups(engine: Engine, tokenizer: Tokenizer, examples: list, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float | None, seed: int, layout: str = "chat") -> Rollout:
    """Sample `group_size` completions for each example's prompt in one batched generate."""
    rendered = [render_prompt(tokenizer, ex, layout) for ex in examples]
    prompts = [ids for _, ids in rendered]
    t0 = time.perf_counter()
    outs = engine.generate([p for p in prompts for _ in range(group_size)], max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed)
    seconds = time.perf_counter() - t0
    reasons = [out.finish_reason for out in outs]
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else engine.config.eos_token_ids[0]
    completions = [out.tokens + [eos] if out.finish_reason == "stop" else out.tokens for out in outs]
    texts = [tokenizer.decode(out.tokens) for out in outs]
    return Rollout(examples, [t for t, _ in rendered], prompts, completions, texts, reasons, seconds,
                   sum(len(o.tokens) for o in outs))


def score_rollout(rollout: Rollout, rewards: list, group_size: int) -> tuple[torch.Tensor, dict]:
    """(total rewards [P, G], logged means: reward/<name>, accuracy, unparseable_rate)."""
    rows = []
    for i, text in enumerate(rollout.texts):
        p = i // group_size
        rows.append(score(rewards, rollout.prompt_texts[p], text, rollout.examples[p]))
    total = torch.tensor([r["total"] for r in rows], dtype=torch.float32).view(-1, group_size)
    means = {f"reward/{name}": sum(r[name] for r in rows) / len(rows) for name, _, _ in rewards}
    correct = [r["accuracy"] if "accuracy" in r else
               accuracy_reward(rollout.prompt_texts[i // group_size], t, rollout.examples[i // group_size])
               for i, (r, t) in enumerate(zip(rows, rollout.texts))]
    means["accuracy"] = sum(correct) / len(correct)
    means["unparseable_rate"] = sum(extract_answer(t) is None for t in rollout.texts) / len(rollout.texts)
    return total, means


# ----------------------------------------------------------------------------- log-probabilities

def sequence_batch(prompts: list[list[int]], completions: list[list[int]], group_size: int, pad_id: int):
    """Right-padded prompt+completion rows for the trainer's forward.

    Returns input_ids [N, T-1], targets [N, T-1] (the next token) and mask [N, T-1] (1 where the
    target is a completion token): logits at position j score token j+1.
    """
    seqs = [prompts[i // group_size] + c for i, c in enumerate(completions)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, c) in enumerate(zip(seqs, completions)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, len(s) - len(c):len(s)] = True
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


@torch.no_grad()
def policy_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, temperature: float,
                    micro_batch_size: int) -> torch.Tensor:
    """log pi(target) at every position [N, T] with the model's training forward, no gradient."""
    return torch.cat([token_logprobs(model(input_ids[a:a + micro_batch_size]), targets[a:a + micro_batch_size],
                                     temperature) for a in range(0, len(input_ids), micro_batch_size)])


@torch.inference_mode()
def engine_logprobs(engine: Engine, prompts: list[list[int]], completions: list[list[int]],
                    temperature: float) -> list[torch.Tensor]:
    """The engine's log-probabilities of each completion's tokens: prefill through the latent cache,
    then the completion in one absorbed-attention forward (what token-by-token decoding computes).
    Compared with the trainer's to catch stale weights or a numerics gap between the two paths."""
    B, Tp = len(prompts), max(len(p) for p in prompts)
    Tc = max(len(c) for c in completions)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(B, Tp, dtype=torch.long)
    comp = torch.zeros(B, Tc, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, :len(p)], comp[b, :len(c)] = torch.tensor(p), torch.tensor(c, dtype=torch.long)
    cache = engine.new_cache(B, Tp + Tc)
    hidden = engine.forward(ids, torch.arange(Tp).expand(B, Tp), cache, absorb=False)
    last = hidden[torch.arange(B), lengths - 1][:, None]  # predicts completion token 0
    if Tc > 1:
        positions = lengths[:, None] + torch.arange(Tc - 1)
        last = torch.cat((last, engine.forward(comp[:, :-1], positions, cache, absorb=True)), dim=1)
    logp = token_logprobs(engine.logits(last), comp, temperature)
    return [logp[b, :len(c)] for b, c in enumerate(completions)]


def logprob_mismatch(trainer_logp: torch.Tensor, mask: torch.Tensor, engine_logp: list[torch.Tensor]) -> dict:
    """Mean and max |trainer - engine| over the completion tokens."""
    diffs = torch.cat([(trainer_logp[i][mask[i]] - e).abs() for i, e in enumerate(engine_logp)])
    return {"logprob_mismatch_mean": float(diffs.mean()), "logprob_mismatch_max": float(diffs.max())}


# ----------------------------------------------------------------------------- one step

def loss_counts(loss_fn, num_sequences: int, num_tokens: int, max_tokens: int) -> dict:
    """The normalisers each variant takes, over the whole batch (micro-batches add up exactly)."""
    return {grpo_loss: dict(num_sequences=num_sequences),
            dr_grpo_loss: dict(num_sequences=num_sequences, max_tokens=max_tokens),
            dapo_loss: dict(num_tokens=num_tokens)}[loss_fn]


def policy_update(model: nn.Module, optimizer, batch: tuple, advantages: torch.Tensor, old_logp: torch.Tensor,
                  ref_logp: torch.Tensor | None, cfg: GRPOConfig, lr: float) -> dict:
    """cfg.mu AdamW steps on one sampled batch; returns the logged loss statistics."""
    input_ids, targets, mask = batch
    _, loss_fn = VARIANTS[cfg.variant]
    counts = loss_counts(loss_fn, len(input_ids), int(mask.sum()), cfg.max_new_tokens)
    kw = dict(beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high, **counts)
    model.train()
    sums = collections.defaultdict(float)
    for _ in range(cfg.mu):
        for a in range(0, len(input_ids), cfg.micro_batch_size):
            sl = slice(a, a + cfg.micro_batch_size)
            logits = model(input_ids[sl])
            logp = token_logprobs(logits, targets[sl], cfg.temperature)
            ref = ref_logp[sl] if ref_logp is not None else None
            loss, stats = loss_fn(logp, old_logp[sl], advantages[sl], mask[sl], ref, **kw)
            loss.backward()
            share = float(mask[sl].sum()) / max(float(mask.sum()), 1.0) / cfg.mu  # token-weighted means
            sums["loss"] += float(loss.detach()) / cfg.mu
            for k, v in stats.items():
                sums[k] += v * share
            with torch.no_grad():
                sums["entropy"] += float((token_entropy(logits, cfg.temperature) * mask[sl]).sum()) \
                    / max(float(mask.sum()), 1.0) / cfg.mu
        sums["grad_norm"] += optimizer_step(model, optimizer, lr, cfg.grad_clip, where="GRPO") / cfg.mu
    for moe in model.moe_layers():  # routing kept for balancing holds the last graph alive; RL does not use it
        moe.scores = moe.indices = None
    model.eval()
    return dict(sums)


def grpo_step(model: nn.Module, ref_model: nn.Module | None, engine: Engine, optimizer, tokenizer: Tokenizer,
              examples: list, rewards: list, cfg: GRPOConfig, step: int) -> tuple[dict, Rollout]:
    """Sample, score, update: one GRPO step (0-based `step`). Returns (metrics row, the rollout)."""
    G = cfg.group_size
    model.eval()
    rollout = sample_groups(engine, tokenizer, examples, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                            seed=cfg.seed * 1_000_003 + step, layout=cfg.layout)
    reward, reward_means = score_rollout(rollout, rewards, G)
    advantages_fn, _ = VARIANTS[cfg.variant]
    advantages = advantages_fn(reward).flatten()

    t0 = time.perf_counter()
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batch = sequence_batch(rollout.prompts, rollout.completions, G, pad)
    input_ids, targets, mask = batch
    old_logp = policy_logprobs(model, input_ids, targets, cfg.temperature, cfg.micro_batch_size)
    ref_logp = None if ref_model is None else \
        policy_logprobs(ref_model, input_ids, targets, cfg.temperature, cfg.micro_batch_size)
    mismatch = logprob_mismatch(old_logp, mask, engine_logprobs(
        engine, [rollout.prompts[i // G] for i in range(len(rollout.completions))], rollout.completions,
        cfg.temperature))
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    stats = policy_update(model, optimizer, batch, advantages, old_logp, ref_logp, cfg, lr)
    update_s = time.perf_counter() - t0

    lengths = [len(c) for c in rollout.completions]
    row = {"step": step + 1, "reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
           **reward_means, "response_length": sum(lengths) / len(lengths),
           "no_signal_groups": float((reward.max(-1).values == reward.min(-1).values).float().mean()),
           "truncation_rate": sum(r == "length" for r in rollout.finish_reasons) / len(lengths),
           **stats, **mismatch, "lr": lr, "rollout_tokens": rollout.new_tokens, "rollout_s": rollout.seconds,
           "rollout_tokens_per_s": rollout.new_tokens / max(rollout.seconds, 1e-9), "update_s": update_s}
    return row, rollout


def signal_warnings(row: dict) -> dict[str, str]:
    """The signals above their WARN_AT threshold, each with advice."""
    return {k: f"{k} = {row[k]:.0%} (> {v:.0%}): {ADVICE[k]}" for k, v in WARN_AT.items() if row.get(k, 0) > v}


# ----------------------------------------------------------------------------- the run

def _load(cfg: GRPOConfig) -> tuple[nn.Module, Tokenizer]:
    path = cfg.out if cfg.resume else cfg.model
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    return load_with_tokenizer(path, dtype=torch.float32)


def _start_step(cfg: GRPOConfig, model, optimizer) -> int:
    out = Path(cfg.out)
    if cfg.resume:
        state = load_train_state(out, model, optimizer)
        truncate_metrics(out / "metrics.jsonl", state["step"])
        return int(state["step"])
    refuse_existing_run(out)
    start_fresh(out, logs=("metrics.jsonl", "samples.jsonl"))
    return 0


def _reference(cfg: GRPOConfig, model: nn.Module) -> nn.Module | None:
    """The frozen KL reference: the run's starting model (reloaded when resuming); None when beta = 0."""
    if cfg.beta <= 0:
        return None
    ref = load_pretrained(cfg.model, dtype=torch.float32) if cfg.resume else copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


class HeldOut:
    """Held-out pass@1 (and maj@k) of the live policy. The time it takes is kept apart, so the
    run's training time and its --max-minutes budgets do not count evaluation."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, task, cfg: GRPOConfig):
        self.model, self.tokenizer, self.task, self.cfg = model, tokenizer, task, cfg
        self.examples = task.examples("test", cfg.eval_size, seed=cfg.seed)
        self.seconds = self.cpu_seconds = 0.0

    def __call__(self) -> dict:
        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate_accuracy(self.model, self.tokenizer, self.task, max_new_tokens=cfg.max_new_tokens,
                                layout=cfg.layout, k=cfg.eval_samples, temperature=cfg.eval_temperature,
                                top_p=cfg.eval_top_p, seed=cfg.seed, examples=self.examples, progress=False)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        return {f"eval/{k}": v for k, v in res.items() if k.startswith(("pass@", "maj@")) or k == "truncated"}


def grpo(cfg: GRPOConfig) -> Path:
    """Run (or resume) GRPO from cfg.model; returns the run folder."""
    out = Path(cfg.out)
    model, tokenizer = _load(cfg)
    ref_model = _reference(cfg, model)
    engine = Engine(model, tokenizer)  # the same module object: rollouts always see the live weights
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay)
    start = _start_step(cfg, model, optimizer)
    rewards = parse_rewards(cfg.reward)
    task = task_from_spec(cfg.data)
    train_set = task.examples("train", cfg.num_train, seed=cfg.seed)
    held_out = HeldOut(model, tokenizer, task, cfg)
    order = RowSampler(len(train_set), cfg.prompts_per_step, cfg.seed)
    meta = {"stage": "grpo", "source": {"model": cfg.model, "data": cfg.data}, "grpo_config": dataclasses.asdict(cfg)}
    print(f"grpo: {model.num_params():,} parameters, {cfg.variant}, {cfg.prompts_per_step} prompts x G="
          f"{cfg.group_size}, rewards {cfg.reward}, beta={cfg.beta}, steps {start}->{cfg.steps}")
    log = MetricsLog(out / "metrics.jsonl")
    t_start, cpu_start, row, warned = time.perf_counter(), time.process_time(), {}, set()
    first_eval = held_out() if start == 0 else {}
    if first_eval:
        log.append({"step": 0, **first_eval})
        print(f"grpo: held-out pass@1 at start {first_eval['eval/pass@1']:.1%}")
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step", desc="grpo", dynamic_ncols=True)
    step = start
    for step in range(start, cfg.steps):
        examples = [train_set[int(i)] for i in order.rows(step)]
        row, rollout = grpo_step(model, ref_model, engine, optimizer, tokenizer, examples, rewards, cfg, step)
        row["elapsed_s"] = time.perf_counter() - t_start - held_out.seconds  # training time: evaluation not counted
        row["cpu_s"] = time.process_time() - cpu_start - held_out.cpu_seconds
        out_of_time = (cfg.max_minutes is not None and row["elapsed_s"] > 60 * cfg.max_minutes) or \
            (cfg.max_cpu_minutes is not None and row["cpu_s"] > 60 * cfg.max_cpu_minutes)
        last = step + 1 == cfg.steps or out_of_time
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            row.update(held_out())
        warned = _warn(row, warned, step)
        log.append(row)
        if cfg.sample_every and (step % cfg.sample_every == 0 or last):
            _write_samples(out / "samples.jsonl", step + 1, rollout, cfg.group_size)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.0%}",
                        len=f"{row['response_length']:.0f}", tok_s=f"{row['rollout_tokens_per_s']:.0f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last:
            save_checkpoint(out, model, optimizer, step + 1, tokenizer, meta)
        if out_of_time:
            print(f"grpo: stopping after {row['elapsed_s'] / 60:.1f} min wall, {row['cpu_s'] / 60:.1f} min CPU "
                  f"(budget: --max-minutes {cfg.max_minutes}, --max-cpu-minutes {cfg.max_cpu_minutes})")
            break
    bar.close()
    if start < cfg.steps:
        save_checkpoint(out, model, optimizer, step + 1, tokenizer, meta)
        plot_grpo(read_metrics(out / "metrics.jsonl"), out / "grpo.png")
    _summary(out, row, first_eval)
    return out


def _warn(row: dict, warned: set, step: int) -> set:
    """row["warnings"] = the signals above threshold; each warns once per stretch above it, not every step."""
    row["warnings"] = signal_warnings(row)
    for key, text in row["warnings"].items():
        if key not in warned:
            warnings.warn(f"grpo step {step + 1}: {text}", GRPOSignalWarning, stacklevel=1)
    return set(row["warnings"])


def _summary(out: Path, row: dict, first_eval: dict) -> None:
    if "eval/pass@1" in row:
        base = f" (from {first_eval['eval/pass@1']:.1%})" if first_eval else ""
        print(f"grpo: step {row['step']}, held-out pass@1 {row['eval/pass@1']:.1%}{base}, "
              f"rollout {row['rollout_tokens_per_s']:,.0f} tokens/s; checkpoint in {out}")


def _write_samples(path: Path, step: int, rollout: Rollout, group_size: int, per_step: int = 4) -> None:
    """A few completions of the step (the first group's), to read what the policy writes."""
    for i in range(min(per_step, len(rollout.texts))):
        p = i // group_size
        append_jsonl(path, {"step": step, "prompt": rollout.examples[p].prompt, "answer": rollout.examples[p].answer,
                       "completion": rollout.texts[i], "finish_reason": rollout.finish_reasons[i]})


def plot_grpo(rows: list[dict], path: str | Path) -> Path:
    """Reward and held-out pass@1, response length, KL, clip fraction and entropy, signal rates, tokens/s."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    panels = [("reward and accuracy", ["reward_mean", "accuracy", "eval/pass@1"]),
              ("response length (tokens)", ["response_length"]), ("KL to reference (k3)", ["kl"]),
              ("clip fraction, entropy", ["clip_fraction", "entropy"]),
              ("signal", ["no_signal_groups", "truncation_rate", "unparseable_rate"]),
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
