"""Reinforcement learning with Group Relative Policy Optimization (command: cli/grpo.py).

    from nanoseek.rl.grpo import GRPOConfig, grpo
    grpo(GRPOConfig(model="runs/sft", out="runs/grpo", steps=60))

One step, readable top to bottom in `grpo_step`:
  1. take `prompts_per_step` training prompts (a seeded permutation: batches are a function of
     the step) from --dataset (a built-in task or your own records, nanoseek.data.records) and
     render each through the chat template, or pretraining's text layout for R1-Zero from a base
     model (both end in an open <think>);
  2. sample G completions per prompt with nanoseek.inference.Engine over the trainer's own model
     object: the engine holds no copy, so every rollout uses the weights of the last optimizer step
     (with LoRA, the adapters merged in for the rollout);
  3. score every completion with the reward functions, TRL's shape fn(prompts, completions,
     **columns) (rewards.py), and turn the rewards into group-relative advantages (scale_rewards);
  4. log-probabilities of the sampled tokens under the sampling policy only when mu > 1 (with
     mu = 1 it is the current policy: pi_old = sg(pi), no extra forward), the frozen reference
     only when beta > 0, and every logprob_check_every steps the engine's own path as a check;
  5. mu optimizer steps with the chosen loss_type and importance-sampling level (losses.py; each
     one function, resolved once in `Algorithm`), optionally bf16 autocast, gradient
     checkpointing, masking of truncated completions; clipping and AdamW through the optimizer step
     every loop shares (nanoseek.train.step);
  6. a metrics.jsonl row: reward mean/std (and per reward), accuracy, response length, KL, clip
     fraction, entropy, no-signal groups, truncation and unparseable-answer rates (with a warning
     when the last three are high), rollout tokens/s; held-out pass@1 (nanoseek.train.evaluate, R1's
     temperature 0.6 / top-p 0.95, averaged over k samples, with its standard error, and cons@k)
     every `eval_every` steps, sample completions every `sample_every` steps, atomic checkpoints,
     grpo.png at the end.

Several processes (torchrun, gloo on CPU): the policy is parallelized like pretraining's
(train/parallelize.py: FSDP2 by default, --ep for expert parallelism, --no-fsdp to replicate). Each
process rolls out a contiguous share of the step's prompts (distributed.share); the [P, G] rewards
are all-gathered so group (and batch) statistics equal the one-process run's, the losses are
normalised by whole-batch counts and the gradients reduced, so one optimizer step is the
one-process step (tests/test_rl_distributed.py; exact when --seed-per-prompt makes the samples
independent of the split). Rollouts need whole weights and no collectives (each process decodes
its own prompts for its own number of steps), so each process samples from a plain full copy of
the policy that is refreshed after every optimizer step, gathered one parameter at a time
(export.copy_full_weights). That is the simplest correct choice, and its cost is stated: the
weights are held once more, whole, on every process (the frozen KL reference is whole too), while
gradients and AdamW state, three times the weights, stay sharded.

Simplifications, stated plainly: every prompt of a step has the same G; dynamic sampling (DAPO's
--dynamic-sampling, sampling.py) runs in one process only; without it no-signal groups are counted
and contribute zero advantage; MoE balancing
biases stay as the input model left them (no aux-loss-free update during RL); the MTP module is
not trained by RL; mu > 1 re-uses the whole batch for each of its optimizer steps; a LoRA run
saves only its merged checkpoint at the end (it cannot resume).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from ..data.prompts import LAYOUTS, checkpoint_layout, task_from_spec
from ..data.records import is_builtin, train_and_held_out
from ..data.tasks import TASKS
from ..hf.io import load_pretrained, load_with_tokenizer
from ..inference import Engine
from ..plots import plot_grpo, read_metrics
from ..tokenizer import Tokenizer
from ..train.batches import RowSampler
from ..train.distributed import (DistEnv, all_gather_cat, all_gather_objects, all_reduce_sum, barrier,
                                  init_distributed, share, shutdown)
from ..train.evaluate import evaluate_accuracy
from ..train.export import copy_full_weights
from ..train.loop import Parallelism, layout_of, opt
from ..train.optim import build_adamw
from ..train.parallelize import Meshes, ModelForward, clip_grad_norm, parallelize
from ..train.state import (load_run_state, refuse_existing_run, save_checkpoint, save_run_checkpoint, start_fresh,
                           truncate_metrics)
from ..train.step import MetricsLog, append_jsonl, optimizer_step
from .lora import add_lora, merge_and_unload, merged
from .losses import (IMPORTANCE_SAMPLING, LOSS_TYPES, SCALE_REWARDS, bnpo_loss, dapo_loss, dr_grpo_loss, grpo_loss,
                     mask_truncated, token_entropy, token_logprobs)
from .rewards import parse_rewards
from .rollouts import (Rollout, engine_logprobs, length_batches, logprob_mismatch, policy_logprobs, row_seeds,
                       sample_groups, score_rollout, sequence_batch)
from .sampling import Scored, combine_means, dynamic_sampling, has_signal

# A signal above its threshold gets a warning: the run is probably learning nothing.
WARN_AT = {"no_signal_groups": 0.8, "truncation_rate": 0.3, "unparseable_rate": 0.5}
ADVICE = {"no_signal_groups": "every completion of most prompts scores the same; make problems easier/harder "
                              "or raise --group-size",
          "truncation_rate": "completions hit --max-new-tokens and get no answer; raise it",
          "unparseable_rate": "most completions have no <answer>; start from an SFT model or add a format reward"}


class GRPOSignalWarning(UserWarning):
    """A GRPO step produced little learning signal (see ADVICE)."""


@dataclass
class GRPOConfig(Parallelism):
    """A GRPO run; every field is also a CLI flag (the parallel layout's, Parallelism, first)."""

    model: str = opt(None, "checkpoint folder to start from (with its tokenizer)", required=True)
    device: str = opt(None, "cpu, cuda or cuda:N for training and rollouts (default: cuda when there is one)")
    out: str = opt(None, "run folder to write (checkpoint, metrics.jsonl, samples.jsonl, grpo.png)", required=True)
    dataset: str = opt("arithmetic", f"prompts: a built-in task ({', '.join(TASKS)}; settings after a colon, e.g. "
                                     "arithmetic:max_digits=2,ops=+-), a .jsonl/.parquet file, a datasets "
                                     "save_to_disk folder or a folder of local data files")
    split: str = opt("train", "split of --dataset to train on")
    prompt_column: str = opt("prompt", "column with the prompt (text, or a list of chat messages)")
    answer_column: str = opt("answer", "column with the reference answer (rewards see every column by name)")
    eval_dataset: str | None = opt(None, "held-out prompts (default: --dataset's --eval-split, else its last "
                                         "--eval-size records, kept out of training)")
    eval_split: str = opt("test", "split of the held-out dataset")
    layout: str | None = opt(None, "prompt layout: chat (template; R1) or text (pretraining's; R1-Zero from a "
                                   "base); default: text for a pretrain checkpoint, else chat", choices=LAYOUTS)
    reward: list[str] = opt(None, "rewards fn(prompts, completions, **columns): built-in accuracy, math, format, "
                                  "code, overlong, length, verifier, or package.module:function, optionally "
                                  "=WEIGHT, space-separated (default: accuracy format=0.1)", nargs="+")
    verifier_command: str | None = opt(None, "the 'verifier' reward's checker command (reads a JSON record on "
                                             "stdin, prints a score or exits 0 for a pass)")
    loss_type: str = opt("grpo", "grpo (per-sequence mean, DeepSeekMath), dr_grpo (sum / budget), dapo (token "
                                 "mean over the batch), bnpo (token mean per micro-batch)", choices=tuple(LOSS_TYPES))
    scale_rewards: str | None = opt(None, "advantage scale: group std, batch std, or none (default: none for "
                                          "dr_grpo, else group)", choices=tuple(SCALE_REWARDS))
    importance_sampling: str = opt("token", "importance ratio per token (GRPO) or per sequence (GSPO)",
                                   choices=tuple(IMPORTANCE_SAMPLING))
    mask_truncated_completions: bool = opt(False, "leave completions cut by --max-new-tokens out of the loss (DAPO)")
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop groups whose rewards are all equal (no "
                                        "signal) and roll out fresh prompts until --prompts-per-step groups have "
                                        "signal, at most --max-resample-rounds extra rounds (one process only)")
    max_resample_rounds: int = opt(4, "dynamic sampling: extra rounds of --prompts-per-step prompts a step may "
                                      "draw; then it trains on the groups with signal it has")
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
    mu: int = opt(1, "num_iterations: optimizer steps per sampled batch (GRPO's mu; with 1 the sampling policy "
                     "is the current one and its log-probabilities are not recomputed)")
    bf16: bool = opt(False, "bf16 autocast for the trainer's forward and backward (weights stay fp32)")
    gradient_checkpointing: bool = opt(False, "recompute each block in backward to save memory")
    lora_rank: int = opt(0, "LoRA rank on attention and dense/shared-expert projections (0 = full fine-tuning; "
                            "routed experts stay frozen); the end checkpoint is merged")
    lora_alpha: float = opt(32.0, "LoRA alpha (scale alpha/rank)")
    seed_per_prompt: bool = opt(False, "sample each prompt's group with its own seed (step, prompt index): rollouts "
                                       "that do not depend on the number of processes, at the cost of batching")
    logprob_check_every: int = opt(0, "compare the engine's log-probabilities with the trainer's every N steps "
                                      "(0 = never; one extra forward)")
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
        if is_builtin(self.dataset):
            task_from_spec(self.dataset)  # raises, naming the task or setting
        elif not Path(self.dataset).exists():
            bad("dataset", f"neither a built-in task ({', '.join(TASKS)}) nor an existing path")
        if self.layout is None:
            self.layout = checkpoint_layout(self.model)
        if self.layout not in LAYOUTS:
            bad("layout", f"expected one of {', '.join(LAYOUTS)}")
        for name, allowed in (("loss_type", LOSS_TYPES), ("importance_sampling", IMPORTANCE_SAMPLING)):
            if getattr(self, name) not in allowed:
                bad(name, f"expected one of {', '.join(allowed)}")
        if self.scale_rewards is None:
            self.scale_rewards = "none" if self.loss_type == "dr_grpo" else "group"
        if self.scale_rewards not in SCALE_REWARDS:
            bad("scale_rewards", f"expected one of {', '.join(SCALE_REWARDS)}")
        if self.lora_rank < 0 or (self.lora_rank and self.resume):
            bad("lora_rank", "must be >= 0, and a LoRA run cannot resume (its checkpoint is merged)")
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
                     "sample_every", "checkpoint_every", "logprob_check_every", "max_resample_rounds"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.eps_high is not None and self.eps_high < 0:
            bad("eps_high", "must be >= 0")
        self.reward = list(self.reward or ["accuracy", "format=0.1"])
        parse_rewards(self.reward, self.verifier_command)  # fails early on a bad module path


# ----------------------------------------------------------------------------- one step

@dataclass
class Algorithm:
    """The functions cfg picks, resolved once: no string is branched on inside the step."""
    advantages: object  # rewards [P, G] -> advantages [P, G]
    loss: object  # one of losses.LOSS_TYPES
    ratio: object  # losses.token_log_ratio or sequence_log_ratio
    precision: object  # a context factory for the trainer's forward (bf16 autocast or nothing)

    @classmethod
    def from_config(cls, cfg: GRPOConfig, device_type: str = "cpu") -> "Algorithm":
        precision = functools.partial(torch.autocast, device_type, dtype=torch.bfloat16) if cfg.bf16 \
            else contextlib.nullcontext
        return cls(SCALE_REWARDS[cfg.scale_rewards], LOSS_TYPES[cfg.loss_type],
                   IMPORTANCE_SAMPLING[cfg.importance_sampling], precision)


def loss_counts(loss_fn, num_sequences: int, num_tokens: int, max_tokens: int, num_micro_batches: int) -> dict:
    """The normalisers each loss takes, over the whole batch of every process (micro-batches and
    processes add up exactly to the one-batch gradient)."""
    return {grpo_loss: dict(num_sequences=num_sequences),
            dr_grpo_loss: dict(num_sequences=num_sequences, max_tokens=max_tokens),
            dapo_loss: dict(num_tokens=num_tokens), bnpo_loss: dict(num_micro_batches=num_micro_batches)}[loss_fn]


def _global_sum(value: float, env: DistEnv) -> float:
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64), env)) if env.distributed \
        else float(value)


def global_means(means: dict, counts: dict, env: DistEnv) -> dict:
    """Means every process computed over its own completions, combined over all of them (a mean over
    no completion is None)."""
    if not env.distributed:
        return means
    return combine_means(all_gather_objects((means, counts), env))[0]


def policy_update(model: nn.Module, optimizer, batch: tuple, advantages: torch.Tensor, old_logp: torch.Tensor | None,
                  ref_logp: torch.Tensor | None, cfg: GRPOConfig, lr: float, algo: Algorithm,
                  env: DistEnv = DistEnv(), num_sequences: int | None = None, forward: nn.Module | None = None,
                  meshes: Meshes | None = None) -> dict:
    """cfg.mu AdamW steps on one sampled batch (this process's share); returns the logged statistics.
    old_logp None (mu = 1): pi_old = sg(pi) inside the loss, no extra forward. forward: the policy as
    parallelize() wrapped it (several processes: its meshes too); default the model itself."""
    if env.distributed and meshes is None:
        raise ValueError("several processes need the parallelized policy (forward and meshes from parallelize)")
    forward = forward or model
    input_ids, targets, mask = batch
    n_micro = -(-len(input_ids) // cfg.micro_batch_size)
    total_tokens = _global_sum(mask.sum(), env)
    counts = loss_counts(algo.loss, num_sequences or len(input_ids), int(total_tokens), cfg.max_new_tokens,
                         int(_global_sum(n_micro, env)))
    kw = dict(beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high, ratio_fn=algo.ratio, **counts)
    model.train()
    sums = collections.defaultdict(float)
    clip = None if meshes is None else functools.partial(clip_grad_norm, meshes=meshes)
    # rows of like length together, each micro-batch cut to its longest row (bnpo's per-micro-batch
    # mean depends on which rows share one, so it keeps the given order)
    micro_batches = length_batches(mask, cfg.micro_batch_size, keep_order=algo.loss is bnpo_loss)
    for _ in range(cfg.mu):
        for i, (rows, n) in enumerate(micro_batches):
            if isinstance(forward, FSDPModule):  # reduce gradients after the last micro-batch only
                forward.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with algo.precision():
                logits = forward(input_ids[rows, :n])
            logp = token_logprobs(logits, targets[rows, :n], cfg.temperature)
            ref = ref_logp[rows, :n] if ref_logp is not None else None
            old = old_logp[rows, :n] if old_logp is not None else None
            m = mask[rows, :n]
            loss, stats = algo.loss(logp, old, advantages[rows], m, ref, **kw)
            # Each process's loss is its share of the global one; FSDP averages gradients over processes.
            (loss * env.world_size).backward()
            share = float(m.sum()) / max(total_tokens, 1.0) / cfg.mu  # token-weighted means
            sums["loss"] += float(loss.detach()) / cfg.mu
            for k, v in stats.items():
                sums[k] += v * share
            with torch.no_grad():
                sums["entropy"] += float((token_entropy(logits, cfg.temperature) * m).sum()) \
                    / max(total_tokens, 1.0) / cfg.mu
        sums["grad_norm"] += optimizer_step(model, optimizer, lr, cfg.grad_clip, where="GRPO", clip=clip) / cfg.mu
    for moe in model.moe_layers():  # routing kept for balancing holds the last graph alive; RL does not use it
        moe.scores = moe.indices = None
    model.eval()
    return {k: _global_sum(v, env) if k in ("loss", "entropy", "clip_fraction", "kl") else v for k, v in sums.items()}


def _rollout(engine, tokenizer, examples, cfg: GRPOConfig, step: int, first_index: int, round: int = 0) -> Rollout:
    """This process's completions, on the live (adapter-merged) weights; with seed_per_prompt every
    completion has a seed of its own (step, prompt's index in the whole batch, row), so the result does
    not depend on how prompts are split across processes, and they still decode as one batch. round:
    dynamic sampling's extra rounds of the step, each with seeds of its own."""
    seed = cfg.seed * 1_000_003 + step + round * 1_000_000_007
    G = cfg.group_size
    seeds = row_seeds(seed, first_index, len(examples), G) if cfg.seed_per_prompt else None
    with merged(engine.model):
        return sample_groups(engine, tokenizer, examples, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                             seed=seed, layout=cfg.layout, row_seeds=seeds)


def grpo_step(model: nn.Module, ref_model: nn.Module | None, engine: Engine, optimizer, tokenizer: Tokenizer,
              examples: list, rewards: list, cfg: GRPOConfig, step: int, env: DistEnv = DistEnv(),
              algo: Algorithm | None = None, forward: nn.Module | None = None,
              meshes: Meshes | None = None, more_examples=None) -> tuple[dict, Rollout]:
    """Sample, score, update: one GRPO step (0-based `step`) over `examples`, the step's prompts of
    every process; this process rolls out its contiguous share. Returns (metrics row, its rollout).
    Several processes: `forward`/`meshes` from parallelize, and an engine over a full copy of the
    policy, refreshed here after the update. cfg.dynamic_sampling (one process): more_examples(r)
    gives the prompts of extra round r (sampling.dynamic_sampling)."""
    G, algo = cfg.group_size, algo or Algorithm.from_config(cfg)
    forward = forward or model
    mine = share(len(examples), env)
    model.eval()

    def scored(exs: list, first_index: int, round: int = 0) -> Scored:
        ro = _rollout(engine, tokenizer, exs, cfg, step, first_index, round)
        return Scored(ro, *score_rollout(ro, rewards, G, cfg.max_new_tokens))

    batch, dynamic = scored(examples[mine], mine.start), {}
    if cfg.dynamic_sampling:
        if more_examples is None:
            raise ValueError("dynamic sampling needs more_examples(round): the prompts of each extra round")
        batch, dynamic = dynamic_sampling(batch, lambda r: scored(more_examples(r), 0, r), len(examples),
                                          cfg.max_resample_rounds)
    rollout, local_reward, reward_means, counts = batch.rollout, batch.rewards, batch.means, batch.counts
    reward_means = global_means(reward_means, counts, env)
    reward = all_gather_cat(local_reward, env)  # group statistics (and the batch std) over every prompt of the step
    advantages = algo.advantages(reward)[mine].flatten()

    t0 = time.perf_counter()
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    input_ids, targets, mask = sequence_batch(rollout.prompts, rollout.completions, G, pad)
    if cfg.mask_truncated_completions:
        mask = mask_truncated(mask, rollout.finish_reasons)
    old_logp = None if cfg.mu == 1 else policy_logprobs(forward, input_ids, targets, mask, cfg.temperature,
                                                        cfg.micro_batch_size, algo.precision)
    ref_logp = None if ref_model is None else \
        policy_logprobs(ref_model, input_ids, targets, mask, cfg.temperature, cfg.micro_batch_size, algo.precision)
    mismatch = {}
    if cfg.logprob_check_every and step % cfg.logprob_check_every == 0:
        trainer_logp = old_logp if old_logp is not None else policy_logprobs(
            forward, input_ids, targets, mask, cfg.temperature, cfg.micro_batch_size, algo.precision)
        with merged(engine.model):
            mismatch = logprob_mismatch(trainer_logp, mask, engine_logprobs(
                engine, [rollout.prompts[i // G] for i in range(len(rollout.completions))], rollout.completions,
                cfg.temperature))
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    stats = policy_update(model, optimizer, (input_ids, targets, mask), advantages, old_logp, ref_logp, cfg, lr,
                          algo, env, num_sequences=reward.numel(), forward=forward, meshes=meshes)
    if engine.model is not model:  # the rollout copy: the next rollouts and evaluations see this update
        copy_full_weights(model, engine.model, meshes.experts if meshes else None)
    update_s = time.perf_counter() - t0

    row = {"step": step + 1, "reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
           **reward_means, "no_signal_groups": float((~has_signal(reward)).float().mean()),
           **dynamic, **stats, **mismatch, "lr": lr, "rollout_tokens": rollout.new_tokens, "rollout_s": rollout.seconds,
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


def _start_step(cfg: GRPOConfig, policy: "Policy", optimizer, env: DistEnv) -> int:
    out = Path(cfg.out)
    if cfg.resume:
        state = load_run_state(out, policy.model, optimizer, policy.meshes)
        if policy.rollout is not policy.model:
            copy_full_weights(policy.model, policy.rollout, policy.meshes.experts)
        if env.is_main:
            truncate_metrics(out / "metrics.jsonl", state["step"])
        return int(state["step"])
    if env.is_main:
        refuse_existing_run(out)
        start_fresh(out, logs=("metrics.jsonl", "samples.jsonl"))
    barrier(env)
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

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, examples: list, cfg: GRPOConfig):
        self.model, self.tokenizer, self.examples, self.cfg = model, tokenizer, examples, cfg
        self.seconds = self.cpu_seconds = 0.0

    def __call__(self) -> dict:
        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        with merged(self.model):
            res = evaluate_accuracy(self.model, self.tokenizer, None, max_new_tokens=cfg.max_new_tokens,
                                    layout=cfg.layout, k=cfg.eval_samples, temperature=cfg.eval_temperature,
                                    top_p=cfg.eval_top_p, seed=cfg.seed, examples=self.examples, progress=False)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        return {f"eval/{k}": v for k, v in res.items()
                if k.startswith(("pass@", "maj@", "cons@")) or k in ("truncated", "stderr")}


@dataclass
class Policy:
    """The model GRPO trains and how it runs: `forward` is it as parallelize() wrapped it (FSDP2 / EP
    under several processes, with their `meshes`; None for one process), `rollout` the module the
    engine samples from and held-out evaluation reads: the model itself in one process, a full copy
    refreshed after every optimizer step under several."""
    model: nn.Module
    forward: nn.Module
    meshes: Meshes | None
    rollout: nn.Module


def _prepare(cfg: GRPOConfig, env: DistEnv):
    """The policy (LoRA-wrapped, parallelized and checkpointed as asked), its reference, tokenizer and
    optimizer."""
    model, tokenizer = _load(cfg)
    model.to(env.device)
    ref_model = _reference(cfg, model)
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)  # the adapters' initialisation: a function of the seed, whatever ran before
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    rollout = copy.deepcopy(model) if env.distributed else model  # before parallelize changes `model` in place
    forward, meshes = parallelize(ModelForward(model), layout_of(cfg, env), env.device.type,
                                  activation_checkpointing=cfg.gradient_checkpointing)
    policy = Policy(model, forward, meshes, rollout.eval())
    return policy, ref_model, tokenizer, build_adamw(model, cfg.lr, cfg.weight_decay)


def grpo(cfg: GRPOConfig, env: DistEnv | None = None) -> Path:
    """Run (or resume) GRPO from cfg.model; returns the run folder. Under torchrun each process rolls
    out its share of every step's prompts (prompts_per_step must divide among them); rewards are
    gathered so advantages are the one-process run's, gradients summed; rank 0 evaluates and writes."""
    own_env = env is None
    env = env or init_distributed(cfg.device)
    try:
        return _run(cfg, env)
    finally:
        if own_env:
            shutdown(env)


def _run(cfg: GRPOConfig, env: DistEnv) -> Path:
    """The loop of `grpo` (long: it reads top to bottom, logging and budgets included)."""
    if cfg.prompts_per_step % env.world_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must divide among {env.world_size} processes")
    if cfg.dynamic_sampling and env.world_size > 1:
        raise ValueError("--dynamic-sampling runs in one process only: ranks would keep different numbers of "
                         "groups, and FSDP needs the same forward/backward count on every rank")
    out = Path(cfg.out)
    policy, ref_model, tokenizer, optimizer = _prepare(cfg, env)
    model = policy.model
    engine = Engine(policy.rollout, tokenizer)  # the live weights (one process: the very module object)
    start = _start_step(cfg, policy, optimizer, env)
    rewards, algo = parse_rewards(cfg.reward, cfg.verifier_command), Algorithm.from_config(cfg, env.device.type)
    train_set, held_examples = train_and_held_out(cfg.dataset, cfg.split, cfg.eval_dataset, cfg.eval_split,
                                                  cfg.eval_size, cfg.prompt_column, cfg.answer_column,
                                                  n=cfg.num_train, seed=cfg.seed)
    held_out = HeldOut(policy.rollout, tokenizer, held_examples, cfg)
    order = RowSampler(len(train_set), cfg.prompts_per_step, cfg.seed)
    meta = {"stage": "grpo", "source": {"model": cfg.model, "dataset": cfg.dataset},
            "grpo_config": dataclasses.asdict(cfg)}
    if env.is_main:
        print(f"grpo: {model.num_params():,} parameters ({sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
              f" trained), {cfg.loss_type}/{cfg.scale_rewards}/{cfg.importance_sampling}, {cfg.prompts_per_step} "
              f"prompts x G={cfg.group_size} over {env.world_size} process(es), rewards {cfg.reward}, "
              f"beta={cfg.beta}, steps {start}->{cfg.steps}")
    log = MetricsLog(out / "metrics.jsonl", enabled=env.is_main)
    t_start, cpu_start, row, warned = time.perf_counter(), time.process_time(), {}, set()
    first_eval = held_out() if start == 0 and env.is_main else {}
    if first_eval:
        log.append({"step": 0, **first_eval})
        print(f"grpo: held-out pass@1 at start {first_eval['eval/pass@1']:.1%}")
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and env.is_main), unit="step", desc="grpo",
               dynamic_ncols=True)
    step = start
    for step in range(start, cfg.steps):
        examples = [train_set[int(i)] for i in order.rows(step)]
        more = lambda r, s=step: [train_set[int(i)] for i in order.rows(s + r * cfg.steps)]  # unseen batches
        row, rollout = grpo_step(model, ref_model, engine, optimizer, tokenizer, examples, rewards, cfg, step, env,
                                 algo, policy.forward, policy.meshes, more)
        row["elapsed_s"] = time.perf_counter() - t_start - held_out.seconds  # training time: evaluation not counted
        row["cpu_s"] = time.process_time() - cpu_start - held_out.cpu_seconds
        out_of_time = (cfg.max_minutes is not None and row["elapsed_s"] > 60 * cfg.max_minutes) or \
            (cfg.max_cpu_minutes is not None and row["cpu_s"] > 60 * cfg.max_cpu_minutes)
        out_of_time = _global_sum(out_of_time, env) > 0  # every process stops at the same step
        last = step + 1 == cfg.steps or out_of_time
        if env.is_main and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            row.update(held_out())
        warned = _warn(row, warned, step) if env.is_main else warned
        log.append(row)
        if env.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or last):
            _write_samples(out / "samples.jsonl", step + 1, rollout, cfg.group_size)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", len=f"{row['response_length']:.0f}",
                        tok_s=f"{row['rollout_tokens_per_s']:.0f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last and not cfg.lora_rank:
            save_run_checkpoint(out, model, optimizer, step + 1, env, policy.meshes, tokenizer, meta)
        barrier(env)
        if out_of_time:
            print(f"grpo: stopping after {row['elapsed_s'] / 60:.1f} min wall, {row['cpu_s'] / 60:.1f} min CPU "
                  f"(budget: --max-minutes {cfg.max_minutes}, --max-cpu-minutes {cfg.max_cpu_minutes})")
            break
    bar.close()
    if start < cfg.steps and cfg.lora_rank and env.is_main:
        # The adapters merged into the whole weights of the rollout module: a plain checkpoint any loader reads.
        plain = merge_and_unload(policy.rollout)
        save_checkpoint(out, plain, build_adamw(plain, cfg.lr, cfg.weight_decay), step + 1, tokenizer, meta)
    elif start < cfg.steps and not cfg.lora_rank:
        save_run_checkpoint(out, model, optimizer, step + 1, env, policy.meshes, tokenizer, meta)
    if start < cfg.steps and env.is_main:
        plot_grpo(read_metrics(out / "metrics.jsonl"), out / "grpo.png")
    barrier(env)
    if env.is_main:
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
