"""Sampling filters and speculative acceptance rules, on hand-made distributions."""

import pytest
import torch

from nanoseek.inference.sampling import (greedy_accept, sample, sampling_probs,
                               speculative_accept, validate_sampling)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits).tolist() == [1, 0]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = sampling_probs(logits, 1.0)
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = sampling_probs(logits, 1.0, top_k=2)
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]))
    # nucleus: the smallest top set reaching 0.8 is {0.5, 0.3}; 0.81 needs the third token too
    assert torch.allclose(sampling_probs(logits, 1.0, top_p=0.8), torch.tensor([0.625, 0.375, 0, 0]))
    assert (sampling_probs(logits, 1.0, top_p=0.81) > 0).sum() == 3
    assert (sampling_probs(logits, 1.0, top_p=0.01) > 0).sum() == 1
    # temperature sharpens
    assert sampling_probs(logits, 0.5)[0] > 0.5


def test_seeded_draws_repeat():
    logits = torch.zeros(4, 50)
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.01),
                                 dict(temperature=float("nan"))])
def test_validate_sampling_rejects(bad):
    args = dict(temperature=1.0, top_k=None, top_p=None) | bad
    with pytest.raises(ValueError):
        validate_sampling(**args)


def test_greedy_accept_keeps_the_matching_prefix():
    logits = torch.zeros(2, 3, 10)
    logits[:, 0, 4] = logits[:, 1, 5] = logits[:, 2, 6] = 1  # target argmax: 4, 5, 6
    accepted, nxt = greedy_accept(logits, torch.tensor([[4, 5], [4, 9]]))
    assert accepted.tolist() == [2, 1] and nxt.tolist() == [6, 5]


def test_speculative_accept_law():
    """One draft: the kept-or-resampled token follows p whatever q is (checked on 200k rows)."""
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.2, 0.6])
    g = torch.Generator().manual_seed(0)
    n = 200_000
    drafts = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g)
    P = torch.stack((p, torch.tensor([1.0, 0.0, 0.0])))[None].expand(n, -1, -1)  # bonus law: always 0
    accepted, nxt = speculative_accept(P, q[None, None].expand(n, 1, -1), drafts, generator=g)
    first = torch.where(accepted == 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=3) / n
    assert torch.allclose(freq, p, atol=0.005)
    # acceptance probability is sum_x min(p, q) = 0.2 + 0.2 + 0.1
    assert accepted.float().mean().item() == pytest.approx(0.5, abs=0.005)
    assert (nxt[accepted == 1] == 0).all()  # the bonus comes from p_k
    # identical draft and target: every draft is kept
    accepted, _ = speculative_accept(P[:100], p[None, None].expand(100, 1, -1), drafts[:100], generator=g)
    assert accepted.eq(1).all()


def test_a_tiny_temperature_samples_the_argmax_instead_of_overflowing():
    logits = torch.tensor([[3.0, 1.0, 2.5, -1.0], [0.0, 0.5, 0.2, 0.4]])
    probs = sampling_probs(logits, 1e-40)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 4).float())
    assert torch.equal(sample(logits, 1e-40, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))
