"""GRPO's rollouts and their log-probabilities: sample G completions per prompt through the
inference engine, score them with the reward functions, and lay them out for the trainer.

    rollout = sample_groups(engine, tokenizer, examples, G, max_new_tokens, temperature, top_p, seed)
    total, means, counts = score_rollout(rollout, rewards, G, max_new_tokens)   # total [P, G]
    input_ids, targets, mask = sequence_batch(rollout.prompts, rollout.completions, G, pad_id)
    logp = policy_logprobs(model, input_ids, targets, mask, temperature, micro_batch_size)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..data.prompts import render_prompt
from ..data.records import reward_columns
from ..data.tasks import extract_answer
from ..inference import Engine
from ..tokenizer import Tokenizer
from .losses import token_logprobs
from .rewards import accuracy_reward, score_batch

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


def row_seeds(seed: int, first_index: int, num_prompts: int, per_prompt: int) -> list[int]:
    """One sampling seed per (prompt, sample) row, from the prompt's index in the whole batch
    (first_index: this call's first prompt): each row is drawn from a generator of its own, so the
    samples do not depend on how prompts are split across processes or generate calls. GRPO
    (--seed-per-prompt) and distillation's rejection sampling both draw with these."""
    return [(seed * 7919 + first_index + i) * per_prompt + j for i in range(num_prompts) for j in range(per_prompt)]


def sample_groups(engine: Engine, tokenizer: Tokenizer, examples: list, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float | None, seed: int, layout: str = "chat",
                  row_seeds: list[int] | None = None) -> Rollout:
    """Sample `group_size` completions for each example's prompt in one batched generate (with
    row_seeds, each completion from a generator of its own: one seed per prompt x group row)."""
    rendered = [render_prompt(tokenizer, ex, layout) for ex in examples]
    prompts = [ids for _, ids in rendered]
    t0 = time.perf_counter()
    outs = engine.generate([p for p in prompts for _ in range(group_size)], max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, seeds=row_seeds)
    seconds = time.perf_counter() - t0
    reasons = [out.finish_reason for out in outs]
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else engine.config.eos_token_ids[0]
    completions = [out.tokens + [eos] if out.finish_reason == "stop" else out.tokens for out in outs]
    texts = [tokenizer.decode(out.tokens) for out in outs]
    return Rollout(examples, [t for t, _ in rendered], prompts, completions, texts, reasons, seconds,
                   sum(len(o.tokens) for o in outs))


def score_rollout(rollout: Rollout, rewards: list, group_size: int, max_new_tokens: int
                  ) -> tuple[torch.Tensor, dict, dict]:
    """(total rewards [P, G], logged means: reward/<name> over the completions it applied to,
    accuracy, unparseable_rate, response_length, truncation_rate, and how many completions each
    mean is over, so that processes can combine theirs). Every reward sees the batch at once with
    the dataset's columns."""
    n = len(rollout.texts)
    group = [i // group_size for i in range(n)]
    columns = {k: [v[g] for g in group] for k, v in reward_columns(rollout.examples).items()}
    columns.update(completion_ids=rollout.completions, finish_reasons=rollout.finish_reasons, group=group,
                   max_new_tokens=max_new_tokens)
    prompts = [rollout.prompt_texts[g] for g in group]
    total, values = score_batch(rewards, prompts, rollout.texts, columns)
    means, counts = {}, {}
    for name, vals in values.items():
        applied = [v for v in vals if v is not None]
        means[f"reward/{name}"] = sum(applied) / len(applied) if applied else None
        counts[f"reward/{name}"] = len(applied)
    if "accuracy" in values:
        correct = values["accuracy"]
    else:
        try:
            correct = accuracy_reward(prompts, rollout.texts, columns["answer"], columns["example"])
        except ValueError:  # a dataset without answers: accuracy is not defined
            correct = None
    means["accuracy"] = sum(correct) / n if correct is not None else None
    means["unparseable_rate"] = sum(extract_answer(t) is None for t in rollout.texts) / n
    means["response_length"] = sum(len(c) for c in rollout.completions) / n
    means["truncation_rate"] = sum(r == "length" for r in rollout.finish_reasons) / n
    counts.update(accuracy=n if correct is not None else 0, unparseable_rate=n, response_length=n, truncation_rate=n)
    return total.view(-1, group_size), means, counts


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


def length_batches(mask: torch.Tensor, micro_batch_size: int, keep_order: bool = False
                   ) -> list[tuple[torch.Tensor, int]]:
    """Micro-batches of a right-padded batch: (row indices, columns they need), longest rows first.

    A row needs the columns up to its last completion token (mask [N, T]); the forward is causal, so
    dropping the columns after that changes none of its log-probabilities. Sorting by length puts rows
    of like length together, so each micro-batch computes little padding: the rows of a GRPO step
    differ in length by up to the whole generation budget. keep_order: slice the rows in their given
    order (for a loss that depends on which rows share a micro-batch), only trimming columns."""
    ends = torch.where(mask.any(1), mask.shape[1] - mask.flip(1).int().argmax(1), 1)
    order = torch.arange(len(ends)) if keep_order else torch.argsort(ends, descending=True, stable=True)
    return [(rows, int(ends[rows].max())) for rows in order.split(micro_batch_size)]


@torch.no_grad()
def policy_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    temperature: float, micro_batch_size: int, precision=contextlib.nullcontext) -> torch.Tensor:
    """log pi(target) at every position [N, T] with the model's training forward, no gradient (0 past
    each row's last completion token: see length_batches); `precision` a context for the forward
    (bf16 autocast)."""
    out = torch.zeros(targets.shape, dtype=torch.float32)
    for rows, n in length_batches(mask, micro_batch_size):
        with precision():
            logits = model(input_ids[rows, :n])
        out[rows, :n] = token_logprobs(logits, targets[rows, :n], temperature).float()
    return out


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


