"""DAPO's dynamic sampling (nanoseek.rl.sampling): groups whose rewards are all equal are dropped and
replaced by groups from further rounds, the number of extra rounds is bounded, and what is kept
stays aligned (rollout rows with their rewards); the step-level tests are in test_rl_grpo.py."""

import pytest
import torch

from nanoseek.rl.rollouts import Rollout
from nanoseek.rl.sampling import Scored, combine_means, dynamic_sampling, has_signal

G = 3


def _round(tag: str, rewards: list[list[float]]) -> Scored:
    """A fake scored round: prompt p's completions are named f"{tag}{p}.{j}", so where every kept row
    came from can be read back."""
    P = len(rewards)
    texts = [f"{tag}{p}.{j}" for p in range(P) for j in range(G)]
    rollout = Rollout([f"ex {tag}{p}" for p in range(P)], [f"prompt {tag}{p}" for p in range(P)],
                      [[p] for p in range(P)], [[p, j] for p in range(P) for j in range(G)], texts,
                      ["stop"] * (P * G), seconds=1.0, new_tokens=P * G)
    acc = sum(sum(r) for r in rewards) / (P * G)
    return Scored(rollout, torch.tensor(rewards), {"accuracy": acc}, {"accuracy": P * G})


FLAT, WRONG, MIXED = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]


def test_has_signal():
    assert has_signal(torch.tensor([FLAT, MIXED, WRONG, [0.5, 0.5, 0.6]])).tolist() == [False, True, False, True]


def test_zero_variance_groups_are_dropped_and_replaced():
    first = _round("a", [FLAT, MIXED, WRONG, [0.0, 1.0, 1.0]])  # 2 of 4 with signal
    later = {1: _round("b", [WRONG, [1.0, 1.0, 0.0], FLAT, FLAT]), 2: _round("c", [MIXED, MIXED, MIXED, FLAT])}
    drawn = []
    batch, stats = dynamic_sampling(first, lambda r: drawn.append(r) or later[r], need=4, max_rounds=5)
    assert drawn == [1, 2]  # stopped as soon as 4 groups had signal
    assert batch.rollout.examples == ["ex a1", "ex a3", "ex b1", "ex c0"]  # one surplus group of round 2 discarded
    assert batch.rollout.texts == [f"{g}.{j}" for g in ("a1", "a3", "b1", "c0") for j in range(G)]
    assert batch.rewards.tolist() == [MIXED, [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], MIXED]
    assert bool(has_signal(batch.rewards).all())
    assert stats == {"dynamic/rounds": 2, "dynamic/groups_sampled": 12, "dynamic/groups_dropped": 6,
                     "dynamic/groups_kept": 4, "dynamic/zero_signal_rate": 0.5}
    # cost and accuracy are over everything rolled out, not only the kept groups
    assert batch.rollout.seconds == 3.0 and batch.rollout.new_tokens == 36
    everything = torch.tensor([FLAT, MIXED, WRONG, [0.0, 1.0, 1.0], WRONG, [1.0, 1.0, 0.0], FLAT, FLAT,
                               MIXED, MIXED, MIXED, FLAT])
    assert batch.means["accuracy"] == pytest.approx(float(everything.mean()))


def test_the_number_of_extra_rounds_is_bounded():
    first = _round("a", [FLAT, MIXED])
    drawn = []
    batch, stats = dynamic_sampling(first, lambda r: drawn.append(r) or _round(f"r{r}", [WRONG, FLAT]),
                                    need=2, max_rounds=3)
    assert drawn == [1, 2, 3] and stats["dynamic/rounds"] == 3
    assert batch.rollout.examples == ["ex a1"] and stats["dynamic/groups_kept"] == 1  # trains on what has signal
    assert stats["dynamic/groups_sampled"] == 8 and stats["dynamic/groups_dropped"] == 7


def test_no_signal_at_all_keeps_the_first_round_and_zero_rounds_draw_nothing():
    first = _round("a", [FLAT, WRONG])
    batch, stats = dynamic_sampling(first, lambda r: _round("b", [WRONG, WRONG]), need=2, max_rounds=1)
    assert batch.rollout.examples == first.rollout.examples and torch.equal(batch.rewards, first.rewards)
    assert stats["dynamic/groups_kept"] == 0 and stats["dynamic/rounds"] == 1

    def never(r):
        raise AssertionError("max_rounds=0 must not draw")
    batch, stats = dynamic_sampling(_round("a", [FLAT, MIXED]), never, need=2, max_rounds=0)
    assert batch.rollout.examples == ["ex a1"] and stats["dynamic/rounds"] == 0
    with pytest.raises(ValueError, match="max_rounds"):
        dynamic_sampling(first, never, need=2, max_rounds=-1)


def test_combine_means_weights_by_counts_and_skips_empty():
    means, counts = combine_means([({"a": 1.0, "b": None}, {"a": 1, "b": 0}), ({"a": 0.0, "b": 2.0}, {"a": 3, "b": 2})])
    assert means == {"a": 0.25, "b": 2.0} and counts == {"a": 4, "b": 2}
