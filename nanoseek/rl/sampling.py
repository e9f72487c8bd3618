"""DAPO's dynamic sampling (Yu et al. 2025, §3.2): keep only the groups that carry a learning signal.

    batch, stats = dynamic_sampling(first, draw, need=8, max_rounds=4)

A group whose G completions all score the same (all right, all wrong) has zero advantage under
every scale_rewards choice, so it adds nothing to the policy gradient but still dilutes the batch
(the loss normalisers count it) and costs a forward and backward. Dynamic sampling drops such
groups and draws further prompts, round after round, until the step holds `need` groups with
signal. Each extra round rolls out a whole batch of fresh prompts (one batched generate); groups
with signal beyond `need` are discarded, as in DAPO. The number of extra rounds is bounded by
`max_rounds`: when it is reached the step trains on the groups with signal it has (fewer than
`need`), and when no round produced a single one, on the first round's groups as they are (zero
advantage: only the KL term moves, as without dynamic sampling).

One process only: under several processes each rank would keep a different number of groups and
run a different number of forward/backward passes, which FSDP's collectives cannot allow; grpo()
refuses the option there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .rollouts import Rollout


@dataclass
class Scored:
    """One round's rollout with its scores: rewards [P, G], and score_rollout's logged means with
    the number of completions each is over."""
    rollout: Rollout
    rewards: torch.Tensor
    means: dict
    counts: dict


def has_signal(rewards: torch.Tensor) -> torch.Tensor:
    """[P] True where a group's rewards are not all equal (a nonzero advantage somewhere)."""
    return rewards.max(-1).values != rewards.min(-1).values


def select_groups(scored: Scored, groups: list[int]) -> Scored:
    """The given groups (prompt indices) of a round, rollout and rewards alike; means and counts
    are left to the caller (they describe what was sampled, not what is kept)."""
    r, G = scored.rollout, scored.rewards.shape[1]
    rows = [p * G + j for p in groups for j in range(G)]
    kept = Rollout([r.examples[p] for p in groups], [r.prompt_texts[p] for p in groups],
                   [r.prompts[p] for p in groups], [r.completions[i] for i in rows], [r.texts[i] for i in rows],
                   [r.finish_reasons[i] for i in rows], r.seconds, r.new_tokens)
    return Scored(kept, scored.rewards[groups], scored.means, scored.counts)


def join(parts: list[Scored], sampled: list[Scored]) -> Scored:
    """The kept parts as one batch (prompt-major), with the means, time and tokens of everything
    sampled: the cost of the step and its accuracy over all it rolled out."""
    ro = [p.rollout for p in parts]
    rollout = Rollout(sum((r.examples for r in ro), []), sum((r.prompt_texts for r in ro), []),
                      sum((r.prompts for r in ro), []), sum((r.completions for r in ro), []),
                      sum((r.texts for r in ro), []), sum((r.finish_reasons for r in ro), []),
                      sum(s.rollout.seconds for s in sampled), sum(s.rollout.new_tokens for s in sampled))
    means, counts = combine_means([(s.means, s.counts) for s in sampled])
    return Scored(rollout, torch.cat([p.rewards for p in parts]), means, counts)


def combine_means(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Means over several sets of completions, each (means, counts), weighted by the counts (a mean
    over no completion is None)."""
    means, counts = {}, {}
    for key in parts[0][0]:
        n = sum(c.get(key, 0) for _, c in parts)
        means[key] = sum(m[key] * c[key] for m, c in parts if c.get(key)) / n if n else None
        counts[key] = n
    return means, counts


def dynamic_sampling(first: Scored, draw: Callable[[int], Scored], need: int, max_rounds: int
                     ) -> tuple[Scored, dict]:
    """Keep the groups with signal from `first` and from up to `max_rounds` further rounds,
    draw(1), draw(2), ..., until `need` are kept. Returns (the step's batch, logged counts):
    dynamic/rounds (extra rounds drawn), dynamic/groups_sampled, dynamic/groups_dropped (no
    signal), dynamic/groups_kept, dynamic/zero_signal_rate (dropped / sampled)."""
    if need < 1 or max_rounds < 0:
        raise ValueError(f"dynamic_sampling: need={need} must be >= 1 and max_rounds={max_rounds} >= 0")
    sampled, parts, kept, rounds = [first], [], 0, 0
    current = first
    while True:
        signal = has_signal(current.rewards).nonzero().flatten().tolist()
        take = signal[:need - kept]
        if take:
            parts.append(select_groups(current, take))
            kept += len(take)
        if kept >= need or rounds >= max_rounds:
            break
        rounds += 1
        current = draw(rounds)
        sampled.append(current)
    batch = join(parts or [first], sampled)
    groups = sum(len(s.rewards) for s in sampled)
    dropped = sum(int((~has_signal(s.rewards)).sum()) for s in sampled)
    return batch, {"dynamic/rounds": rounds, "dynamic/groups_sampled": groups, "dynamic/groups_dropped": dropped,
                   "dynamic/groups_kept": kept, "dynamic/zero_signal_rate": dropped / groups}
