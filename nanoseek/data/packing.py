"""Pack tokenized documents into fixed-length rows without letting anything cross a document.

    rows = pack_documents(tok.encode_batch(texts, add_bos=True), seq_len=256, eos_id=tok.eos_id)
    mask = document_mask(rows.doc_ids)                      # attention stays inside documents
    logits = model(rows.input_ids, positions=rows.positions, mask=mask)
    loss = F.cross_entropy(logits.flatten(0, 1), rows.targets.flatten(), ignore_index=-100)
    mtp_targets = rows.targets_at(k)                        # MTP depth k: token i+k+1

Each row holds whole documents (best fit by decreasing length, so little padding; rows come
longest-document first, so shuffle them). A document never spans two rows unless it is longer
than seq_len; then it is either cut into seq_len chunks (each its own document; counted in
n_split) or dropped (drop_long=True; counted in n_dropped). Positions restart at 0 in each
document. Padding has doc id -1 (PAD_DOC). Targets are -100 wherever the predicted token is in
another document, is padding, or is not a label (for SFT: outside the assistant's tokens).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100
PAD_DOC = -1


def shifted_targets(input_ids: torch.Tensor, doc_ids: torch.Tensor, k: int = 0,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """target[:, i] = input_ids[:, i+k+1] if tokens i and i+k+1 are in the same document (and
    token_mask marks token i+k+1 as a label), else -100. k=0 is next-token prediction; k>=1 is
    MTP depth k. Documents are contiguous in a row, so equal doc ids at both ends mean the same
    document throughout; doc ids < 0 are padding."""
    if k < 0:
        raise ValueError(f"k={k}: must be >= 0")
    N, T = input_ids.shape
    out = torch.full_like(input_ids, IGNORE)
    s = k + 1  # distance to the predicted token
    if s >= T:
        return out
    ok = (doc_ids[:, :-s] == doc_ids[:, s:]) & (doc_ids[:, :-s] >= 0)
    if token_mask is not None:
        ok &= token_mask[:, s:].bool()
    out[:, :-s] = torch.where(ok, input_ids[:, s:], IGNORE)
    return out


@dataclass
class PackedRows:
    """Packed training rows, all [N, seq_len]. `token_mask` marks tokens that may be predicted
    (all real tokens when pretraining; the assistant's tokens for SFT); `loss_mask` marks the
    positions that have a next-token target."""
    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    token_mask: torch.Tensor
    n_docs: int       # documents given
    n_split: int      # longer than seq_len and cut into chunks
    n_dropped: int    # longer than seq_len and left out (drop_long=True)
    n_pad: int        # padding tokens

    def targets_at(self, k: int) -> torch.Tensor:
        """Targets for MTP depth k (token i+k+1), -100 across documents; targets_at(0) == targets."""
        return shifted_targets(self.input_ids, self.doc_ids, k, self.token_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _best_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most seq_len tokens; longest first, each into
    the fullest row it fits (best fit). Deterministic."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            space, r = seq_len - n, len(rows) - 1
        else:
            space, r = free.pop(at)
            rows[r].append(i)
            space -= n
        if space > 0:
            bisect.insort(free, (space, r))
    return rows


def _pack(docs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, drop_long: bool,
          pad_id: int) -> PackedRows:
    """Pack (ids, token_mask) pairs; see the module docstring."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be at least 2")
    pieces, n_split, n_dropped = [], 0, 0
    for ids, mask in docs:
        if len(ids) != len(mask):
            raise ValueError(f"document {len(pieces)}: {len(ids)} ids but {len(mask)} mask entries")
        if len(ids) <= seq_len:
            if len(ids):
                pieces.append((ids, mask))
        elif drop_long:
            n_dropped += 1
        else:
            n_split += 1
            pieces += [(ids[s:s + seq_len], mask[s:s + seq_len]) for s in range(0, len(ids), seq_len)]
    rows = _best_fit_decreasing([len(ids) for ids, _ in pieces], seq_len)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    doc_ids = torch.full((len(rows), seq_len), PAD_DOC, dtype=torch.long)
    positions = torch.zeros((len(rows), seq_len), dtype=torch.long)
    token_mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for r, members in enumerate(rows):
        t = 0
        for p in sorted(members):  # keep corpus order inside a row
            ids, mask = pieces[p]
            input_ids[r, t:t + len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            token_mask[r, t:t + len(ids)] = torch.as_tensor(mask, dtype=torch.bool)
            doc_ids[r, t:t + len(ids)] = p
            positions[r, t:t + len(ids)] = torch.arange(len(ids))
            t += len(ids)
    targets = shifted_targets(input_ids, doc_ids, 0, token_mask)
    return PackedRows(input_ids, doc_ids, positions, targets, targets != IGNORE, token_mask,
                      n_docs=len(docs), n_split=n_split, n_dropped=n_dropped,
                      n_pad=int((doc_ids == PAD_DOC).sum()))


def pack_documents(token_lists: list[list[int]], seq_len: int, eos_id: int | None = None,
                   drop_long: bool = False, pad_id: int | None = None) -> PackedRows:
    """Pack pretraining documents. With eos_id, each document that does not already end in it
    gets it appended, so the model learns where documents end. Padding uses pad_id (default:
    eos_id, else 0); it is never a target."""
    if eos_id is not None:
        token_lists = [list(ids) + [eos_id] if ids and ids[-1] != eos_id else ids for ids in token_lists]
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    return _pack([(ids, [1] * len(ids)) for ids in token_lists], seq_len, drop_long, pad)


def pack_chat(encoded: list[tuple[list[int], list[int]]], seq_len: int, drop_long: bool = True,
              pad_id: int = 0) -> PackedRows:
    """Pack (ids, assistant_mask) pairs from Tokenizer.encode_chat for SFT: only tokens the
    assistant wrote are targets. Conversations longer than seq_len are dropped by default (a
    cut conversation loses its prompt); drop_long=False cuts them into chunks instead."""
    return _pack(encoded, seq_len, drop_long, pad_id)


def tokenize_documents(docs: Sequence, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, token_mask) per document from load_documents/load_data, ready for pack_chat: plain
    text becomes BOS + text + EOS with every token a label; a conversation is encoded with the
    chat template and only the assistant's tokens are labels."""
    out = []
    for doc in docs:
        if isinstance(doc, str):
            ids = tokenizer.encode(doc, add_bos=tokenizer.bos_id is not None)
            ids += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
            out.append((ids, [1] * len(ids)))
        else:
            out.append(tokenizer.encode_chat(doc))
    return out
