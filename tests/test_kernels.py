"""CPU fast paths (kernels.py): the blocked GEMV against F.linear, the MoE grouping on both of its paths."""

import pytest
import torch

from nanoseek.kernels import GEMV_MIN_NUMEL, group_by_expert, linear, sort_by_expert


@pytest.mark.parametrize("shape", [(1024,), (1, 1, 1024), (2, 1, 1024), (1, 2, 1024), (3, 1024)])
def test_linear_matches_f_linear_on_every_path(shape):
    """kernels.linear's decoding path (1-2 rows, blocks of output rows as one bmm) and its fallback."""
    w, b = torch.randn(516, 1024), torch.randn(516)
    assert w.numel() >= GEMV_MIN_NUMEL  # large enough for the bmm path
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4)
        assert linear(x, w).shape == shape[:-1] + (516,)
    w.requires_grad_(True)  # with autograd: F.linear, gradients intact
    linear(x, w, b).sum().backward()
    assert torch.allclose(w.grad, x.reshape(-1, 1024).sum(0).expand(516, 1024))


def _as_lists(groups, n_tokens):
    """{expert: (token rows, pair rows)} as Python lists, slices expanded."""
    out = {}
    for e, tok, pairs in groups:
        rows = list(range(n_tokens))[tok] if isinstance(tok, slice) else tok.tolist()
        p = list(range(10 ** 6))[pairs] if isinstance(pairs, slice) else pairs.tolist()
        out[e] = (rows, p)
    return out


@pytest.mark.parametrize("n_tokens", [1, 2, 7])
def test_group_by_expert_covers_every_pair_once_in_order(n_tokens):
    E, K = 8, 2
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(n_tokens)])  # [N, K], distinct per token
    groups = _as_lists(group_by_expert(indices, E), n_tokens)
    # the reference: pair j = (token j // K, expert indices.flatten()[j]), pairs in order within an expert
    want: dict[int, tuple[list[int], list[int]]] = {}
    for j, e in enumerate(indices.flatten().tolist()):
        want.setdefault(e, ([], []))
        want[e][0].append(j // K)
        want[e][1].append(j)
    assert groups == want
    order, counts = sort_by_expert(indices, E)
    assert sum(counts) == n_tokens * K and len(counts) == E
    assert indices.flatten()[order].tolist() == sorted(indices.flatten().tolist())


def test_group_by_expert_decoding_path_uses_slices():
    """One token, K experts (N*K <= E): every expert gets slices, no index tensors."""
    indices = torch.tensor([[5, 2]])
    groups = list(group_by_expert(indices, 8))
    assert [e for e, _, _ in groups] == [5, 2]
    assert all(isinstance(tok, slice) and isinstance(p, slice) for _, tok, p in groups)
