"""Training objectives: cross-entropy normalisation, MTP targets against a hand-worked case,
the MTP loss, and the sequence-wise balance loss against hand-computed values."""

import math

import torch
import torch.nn.functional as F

from nanoseek.data import pack_documents
import pytest
from nanoseek.train.losses import IGNORE, cross_entropy, linear_cross_entropy, mtp_loss, mtp_targets, sequence_balance_loss


def test_cross_entropy_is_masked_mean_and_takes_a_global_count():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 1] = targets[1, 4] = IGNORE
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert torch.allclose(cross_entropy(logits, targets), ref)
    # With the global count of a batch twice as large, the same rows give half the value.
    assert torch.allclose(cross_entropy(logits, targets, num_tokens=16), ref / 2)


def test_mtp_targets_hand_worked_two_documents():
    # Row: document A = 10 11 12 13, document B = 20 21 22.
    ids = torch.tensor([[10, 11, 12, 13, 20, 21, 22]])
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    nxt = torch.tensor([[11, 12, 13, IGNORE, 21, 22, IGNORE]])  # next token, never across documents
    # Depth 1 predicts token i+2 from position i; depth 2 token i+3.
    assert mtp_targets(nxt, doc, 1).tolist() == [[12, 13, IGNORE, IGNORE, 22, IGNORE, IGNORE]]
    assert mtp_targets(nxt, doc, 2).tolist() == [[13, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert mtp_targets(nxt, doc, 7).eq(IGNORE).all()


def test_mtp_targets_agree_with_the_packer():
    rows = pack_documents([[5, 6, 7, 8, 9], [3, 4, 5], [9, 8, 7, 6]], seq_len=8, eos_id=1)
    for k in (1, 2, 3):
        assert torch.equal(mtp_targets(rows.targets, rows.doc_ids, k), rows.targets_at(k))


def test_mtp_loss_uses_each_depths_shifted_targets():
    V = 6
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    doc = torch.zeros_like(ids)
    nxt = torch.tensor([[2, 3, 4, 5, IGNORE]])
    logits = [torch.randn(1, 5, V), torch.randn(1, 5, V)]
    t1, t2 = mtp_targets(nxt, doc, 1), mtp_targets(nxt, doc, 2)
    # By hand: depth 1 scores tokens 3, 4, 5 at positions 0, 1, 2; depth 2 tokens 4, 5 at positions 0, 1.
    lp1, lp2 = logits[0].log_softmax(-1)[0], logits[1].log_softmax(-1)[0]
    d1 = -(lp1[0, 3] + lp1[1, 4] + lp1[2, 5]) / 3
    d2 = -(lp2[0, 4] + lp2[1, 5]) / 2
    assert torch.allclose(mtp_loss(logits, [t1, t2]), (d1 + d2) / 2)


def test_sequence_balance_loss_hand_computed_and_uniform():
    # One sequence, T=2 tokens, E=2 experts, K=1; both tokens pick expert 0.
    scores = torch.tensor([[[0.9, 0.1], [0.6, 0.4]]], requires_grad=True)
    indices = torch.tensor([[[0], [0]]])
    # f = E/(K T) * counts = [2, 0]; P = mean normalised scores = [0.75, 0.25]; loss = 2 * 0.75.
    loss = sequence_balance_loss(scores, indices)
    assert math.isclose(loss.item(), 1.5, rel_tol=1e-6)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # Perfectly uniform routing scores exactly 1.
    E, K, T = 4, 2, 4
    uniform = torch.full((1, T, E), 0.5)
    idx = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert math.isclose(sequence_balance_loss(uniform, idx).item(), 1.0, rel_tol=1e-6)
    assert idx.shape[-1] == K


def test_sequence_balance_loss_ignores_invalid_tokens():
    scores = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.1, 0.9]]])
    indices = torch.tensor([[[0], [0], [1]]])
    valid = torch.tensor([[True, True, False]])
    assert math.isclose(sequence_balance_loss(scores, indices, valid).item(), 1.5, rel_tol=1e-6)
    assert sequence_balance_loss(scores, indices).item() != 1.5


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_unfused(autocast):
    torch.manual_seed(0)
    h = torch.randn(2, 50, 16, requires_grad=True)
    w = torch.randn(33, 16, requires_grad=True)
    t = torch.randint(0, 33, (2, 50))
    t[0, :7] = IGNORE
    ref = cross_entropy(h @ w.t(), t, 80)
    g_ref = torch.autograd.grad(3 * ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = linear_cross_entropy(h, w, t, 80, chunk_size=17)  # chunks that split rows unevenly
    g_got = torch.autograd.grad(3 * got, (h, w))
    tol = 1e-2 if autocast else 1e-5
    assert abs(got.detach().item() - ref.detach().item()) < tol
    for a, b in zip(g_got, g_ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
