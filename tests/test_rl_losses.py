"""GRPO losses: advantages and the clipped objective against hand-computed values, the k3 KL,
the variants' normalisations, micro-batch accumulation, and the distillation KLs."""

import copy
import math

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.model import Transformer
from nanoseek.rl.losses import (batch_scaled_advantages, bnpo_loss, clipped_surrogate, dapo_loss, dr_grpo_advantages,
                                dr_grpo_loss, forward_kl, grpo_advantages, grpo_loss, kl_k3, mask_truncated,
                                reverse_kl, sequence_log_ratio, token_entropy, token_logprobs)


def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = grpo_advantages(rewards, eps=0.0)
    s = math.sqrt(1 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    s3 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert torch.allclose(adv[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / s3)
    adv = grpo_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no signal
    assert torch.allclose(dr_grpo_advantages(rewards)[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_advantages_need_groups():
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"\[prompts, G\]"):
        dr_grpo_advantages(torch.ones(4))


def test_clipped_surrogate_hand_computed():
    # ratios 1.5 and 0.5, advantages +1 and -1: every case of PPO's min(r A, clip(r) A)
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    obj, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2)
    assert torch.allclose(obj, torch.tensor([[1.2, 0.5], [-1.5, -0.8]]))
    assert clipped.tolist() == [[True, False], [False, True]]
    obj_hi, _ = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)  # clip-higher
    assert torch.allclose(obj_hi, torch.tensor([[1.28, 0.5], [-1.5, -0.8]]))


def _batch():
    """Two completions of lengths 3 and 1 (padded to 3), hand-picked ratios and KLs."""
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.1, 1.0, 1.0]]))
    ref = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0])
    return logp, old, adv, mask, ref


def test_grpo_loss_hand_computed():
    logp, old, adv, mask, ref = _batch()
    # surrogates: row 0 (A=2): min(1.5*2, 1.2*2)=2.4, 1*2=2, 0.5*2=1; row 1 (A=-1): min(-1.1, -1.1)=-1.1
    k3 = [math.exp(-math.log(1.5)) + math.log(1.5) - 1, 2 - math.log(2) - 1, math.exp(math.log(2)) - math.log(2) - 1]
    k3_row1 = math.exp(-math.log(1.1)) + math.log(1.1) - 1
    beta = 0.1
    row0 = ((-2.4 + beta * k3[0]) + (-2.0 + beta * k3[1]) + (-1.0 + beta * k3[2])) / 3
    row1 = 1.1 + beta * k3_row1
    loss, stats = grpo_loss(logp, old, adv, mask, ref, beta=beta)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(1 / 4)
    assert stats["kl"] == pytest.approx((sum(k3) + k3_row1) / 4, rel=1e-6)


def test_variants_normalise_differently():
    logp, old, adv, mask, ref = _batch()
    per_token = torch.tensor([[-2.4, -2.0, -1.0], [1.1, 0.0, 0.0]])
    dr, _ = dr_grpo_loss(logp, old, adv, mask, beta=0.0, max_tokens=10)
    assert dr.item() == pytest.approx(per_token.sum().item() / (10 * 2), rel=1e-6)
    dapo, _ = dapo_loss(logp, old, adv, mask, beta=0.0, eps_high=0.2)
    assert dapo.item() == pytest.approx(per_token.sum().item() / 4, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, None, beta=0.04)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_batch(variant):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (4, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    old = token_logprobs(logits, tokens).detach() + 0.1 * torch.randn(4, 5, generator=g)
    ref = old + 0.1 * torch.randn(4, 5, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0])
    fn = {"grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "dapo": dapo_loss}[variant]
    counts = {"grpo": dict(num_sequences=4), "dr_grpo": dict(num_sequences=4, max_tokens=5),
              "dapo": dict(num_tokens=int(mask.sum()))}[variant]
    full, _ = fn(token_logprobs(logits, tokens), old, adv, mask, ref, beta=0.04)
    (g_full,) = torch.autograd.grad(full, logits)
    parts = sum(fn(token_logprobs(logits[s], tokens[s]), old[s], adv[s], mask[s], ref[s], beta=0.04, **counts)[0]
                for s in (slice(0, 2), slice(2, 4)))
    (g_parts,) = torch.autograd.grad(parts, logits)
    assert parts.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(g_parts, g_full, atol=1e-6)


def test_first_update_gradient_is_advantage_weighted_logprob():
    """With pi == pi_old (mu = 1) GRPO's gradient is that of mean_i mean_t A_i log pi."""
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.5, -0.5])
    logp = token_logprobs(logits, tokens)
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, beta=0.0)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    reference = -((logp * mask).sum(1) / mask.sum(1) * adv).mean()
    (g_ref,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_k3_is_zero_when_policy_equals_reference():
    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, num_hidden_layers=2, num_nextn_predict_layers=0)
    policy = Transformer(cfg).eval()
    reference = copy.deepcopy(policy)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        logp = token_logprobs(policy(tokens[:, :-1]), tokens[:, 1:])
        ref_logp = token_logprobs(reference(tokens[:, :-1]), tokens[:, 1:])
    assert torch.equal(kl_k3(logp, ref_logp), torch.zeros_like(logp))
    other = kl_k3(logp, ref_logp + 0.3 * torch.randn_like(ref_logp))
    assert (other > 0).all()


def test_k3_is_unbiased():
    """E_{x~p}[k3] = KL(p || q) for two small categorical distributions."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    expected = (p * kl_k3(p.log(), q.log())).sum()
    assert expected.item() == pytest.approx(exact.item(), rel=1e-6)


def test_distillation_kls():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert forward_kl(s, s, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert reverse_kl(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    ps, pt = s.softmax(-1), t.softmax(-1)
    fwd = (pt * (pt.log() - ps.log())).sum(-1)
    rev = (ps * (ps.log() - pt.log())).sum(-1)
    assert forward_kl(s, t, mask).item() == pytest.approx((fwd * mask).sum().item() / 4, rel=1e-5)
    assert reverse_kl(s, t, mask).item() == pytest.approx((rev * mask).sum().item() / 4, rel=1e-5)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert token_logprobs(logits, torch.tensor([[1]]), temperature=0.5).item() == pytest.approx(math.log(0.9))
    assert token_entropy(logits).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_batch_scaled_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    std = torch.tensor([1.0, 0.0, 3.0, 3.0]).std().item()  # one scale for the batch
    assert torch.allclose(batch_scaled_advantages(rewards, eps=0.0), torch.tensor([[0.5, -0.5], [0.0, 0.0]]) / std)


def test_bnpo_averages_tokens_per_micro_batch():
    logp, old, adv, mask, _ = _batch()
    per_token = torch.tensor([[-2.4, -2.0, -1.0], [1.1, 0.0, 0.0]])
    whole, _ = bnpo_loss(logp, old, adv, mask)
    assert whole.item() == pytest.approx(per_token.sum().item() / 4, rel=1e-6)  # = DAPO on one micro-batch
    halves = [bnpo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], num_micro_batches=2)[0]
              for i in range(2)]
    assert sum(h.item() for h in halves) == pytest.approx((-5.4 / 3 + 1.1) / 2, rel=1e-6)


def test_sequence_level_importance_sampling_hand_computed():
    """GSPO: row 0's ratio is the geometric mean (1.5 * 1 * 0.5)^(1/3), inside the clip; row 1's is 1.1."""
    logp, old, adv, mask, _ = _batch()
    s0 = 0.75 ** (1 / 3)
    ratio = sequence_log_ratio(logp, old, mask).exp()
    assert torch.allclose(ratio, torch.tensor([[s0] * 3, [1.1] * 3]))
    loss, stats = grpo_loss(logp, old, adv, mask, beta=0.0, ratio_fn=sequence_log_ratio)
    assert loss.item() == pytest.approx((-2 * s0 + 1.1) / 2, rel=1e-6)
    assert stats["clip_fraction"] == 0.0
    # its gradient: s_i * A_i * mean over the completion's tokens of d log pi
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, adv, mask, beta=0.0, ratio_fn=sequence_log_ratio)[0].backward()
    assert torch.allclose(lp.grad[0], torch.full((3,), -2 * s0 / 3 / 2))
    assert torch.allclose(lp.grad[1], torch.tensor([1.1 / 2, 0.0, 0.0]))


def test_mu_one_needs_no_old_logprobs():
    """old_logp=None (pi_old = sg(pi)): the same loss and gradient as passing pi's own values."""
    logp, _, adv, mask, ref = _batch()
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    la, _ = dapo_loss(a, None, adv, mask, ref, beta=0.1)
    lb, _ = dapo_loss(b, logp.clone(), adv, mask, ref, beta=0.1)
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item()) and torch.allclose(a.grad, b.grad)


def test_mask_truncated_drops_cut_completions():
    mask = torch.ones(3, 2, dtype=torch.bool)
    assert mask_truncated(mask, ["stop", "length", "stop"]).tolist() == [[True, True], [False, False], [True, True]]
