"""Batches of packed rows: which rows each step trains on, and the positions and attention mask of
rows that hold several documents.

    sampler = RowSampler(num_rows=len(rows), batch_size=32, seed=0)
    ids = sampler.rows(step)                                  # the same rows for a step, resumed or not
    positions, mask = document_positions(doc_ids), attention_mask(doc_ids)   # doc_ids [B, T]
    check_rows(rows, vocab_size)                              # clear errors before training starts
"""

from __future__ import annotations

import torch

from ..model import document_mask
from .losses import IGNORE


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each packed document starts: doc_ids [B, T] -> [B, T]."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor | None:
    """None (plain causal, the fast path) when every row is one document, else the document mask."""
    if bool((doc_ids == doc_ids[:, :1]).all()):
        return None
    return document_mask(doc_ids)


class RowSampler:
    """Which rows each optimizer step trains on: a seeded permutation per epoch, a pure function
    of (step, seed), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_rows, generator=g)}  # keep one epoch
        return self._perms[epoch]

    def rows(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._perm(int(p) // self.num_rows)[int(p) % self.num_rows] for p in pos])


def check_rows(rows, vocab_size: int) -> None:
    """Clear errors for data the loop cannot train on."""
    for name in ("input_ids", "doc_ids", "targets"):
        t = getattr(rows, name, None)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"training rows: {name} must be a 2-D tensor [rows, seq_len]")
        if t.shape != rows.input_ids.shape:
            raise ValueError(f"training rows: {name} has shape {tuple(t.shape)}, input_ids {tuple(rows.input_ids.shape)}")
    if rows.input_ids.shape[0] == 0:
        raise ValueError("training rows: no data (0 rows after packing)")
    hi = int(rows.input_ids.max())
    if hi >= vocab_size or int(rows.input_ids.min()) < 0:
        raise ValueError(f"training rows: token id {hi} is outside the model's vocab_size={vocab_size}")
    if not bool((rows.targets != IGNORE).any()):
        raise ValueError("training rows: every target is masked (-100): nothing to learn from")
