"""Batches of packed rows: per-document positions and masks, and the step-determined row order."""

import torch

from nanoseek.train.batches import RowSampler, attention_mask, document_positions


def test_document_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 2, 2]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_one_document_per_row_needs_no_mask():
    assert attention_mask(torch.tensor([[3, 3, 3], [5, 5, 5]])) is None
    mask = attention_mask(torch.tensor([[0, 0, 1]]))
    assert mask is not None and mask.shape[-2:] == (3, 3)


def test_row_order_is_a_function_of_step_and_seed():
    a, b = RowSampler(10, 4, seed=1), RowSampler(10, 4, seed=1)
    steps = [a.rows(s).tolist() for s in range(5)]
    assert [b.rows(s).tolist() for s in (4, 0, 3, 1, 2)] == [steps[s] for s in (4, 0, 3, 1, 2)]
    assert sorted(sum(steps[:2], []) + steps[2][:2]) == list(range(10))  # the first epoch sees every row once
