"""Packing: rows hold whole documents, targets (next-token and MTP) never cross a document."""

import pytest
import torch

from nanoseek.data.packing import PAD_DOC, pack_chat, pack_documents, shifted_targets, tokenize_documents

# Token values are unique across documents, so every target can be traced to its document.
DOCS = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40], [50, 51, 52, 53, 54]]


def _doc_of(token: int) -> int:
    return token // 10


def _check_targets(rows, k: int, docs) -> None:
    """Every target is the token k+1 further on in the same document, and every such pair is a target."""
    t = rows.targets_at(k)
    n = 0
    for r in range(len(rows)):
        for i in range(rows.input_ids.shape[1]):
            if t[r, i] == -100:
                continue
            n += 1
            assert rows.doc_ids[r, i] >= 0 and rows.doc_ids[r, i] == rows.doc_ids[r, i + k + 1]
            assert t[r, i] == rows.input_ids[r, i + k + 1]
            assert _doc_of(int(t[r, i])) == _doc_of(int(rows.input_ids[r, i]))
    assert n == sum(max(len(d) - k - 1, 0) for d in docs)


def test_rows_keep_documents_whole_and_targets_inside_them():
    rows = pack_documents(DOCS, seq_len=6)
    assert rows.input_ids.shape == (3, 6) and rows.input_ids.dtype == torch.long
    assert (rows.n_docs, rows.n_split, rows.n_dropped) == (5, 0, 0)
    assert rows.n_pad == 3 * 6 - sum(map(len, DOCS))
    for r in range(len(rows)):  # each document's tokens sit contiguously, in order, in one row
        for d in rows.doc_ids[r].unique().tolist():
            if d != PAD_DOC:
                assert rows.input_ids[r][rows.doc_ids[r] == d].tolist() in DOCS
    assert torch.equal(rows.targets, rows.targets_at(0))
    assert torch.equal(rows.loss_mask, rows.targets != -100)
    for k in range(4):
        _check_targets(rows, k, DOCS)
    pad = rows.doc_ids == PAD_DOC
    assert not rows.loss_mask[pad].any()
    for r in range(len(rows)):  # positions restart at every document
        starts = [i for i in range(6) if not pad[r, i] and (i == 0 or rows.doc_ids[r, i] != rows.doc_ids[r, i - 1])]
        assert all(rows.positions[r, i] == 0 for i in starts)


def test_best_fit_packing():
    rows = pack_documents([[1] * 5, [2] * 3, [3] * 3, [4]], seq_len=6)
    assert len(rows) == 2 and rows.n_pad == 0


def test_eos_appended_once():
    rows = pack_documents([[5, 6], [7, 9]], seq_len=4, eos_id=9)
    assert sorted(rows.input_ids[rows.doc_ids != PAD_DOC].tolist()) == [5, 6, 7, 9, 9]
    assert rows.targets.flatten().tolist().count(9) == 2  # both documents learn to end
    assert pack_documents([[]], seq_len=4, eos_id=9).input_ids.shape[0] == 0


def test_long_documents_are_split_or_dropped_and_counted():
    docs = [list(range(100, 113)), [20, 21]]
    rows = pack_documents(docs, seq_len=5)
    assert (rows.n_split, rows.n_dropped) == (1, 0)
    kept = rows.input_ids[rows.doc_ids != PAD_DOC].tolist()
    assert sorted(kept) == sorted(docs[0] + docs[1])  # nothing lost
    assert rows.doc_ids[rows.input_ids == 100].item() != rows.doc_ids[rows.input_ids == 105].item()
    rows = pack_documents(docs, seq_len=5, drop_long=True)
    assert (rows.n_split, rows.n_dropped, len(rows)) == (0, 1, 1)
    assert rows.input_ids[0, :2].tolist() == [20, 21]


def test_pack_chat_targets_only_assistant_tokens():
    convs = [([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), ([6, 7, 8], [0, 1, 1]), (list(range(20)), [1] * 20)]
    rows = pack_chat(convs, seq_len=8)
    assert (rows.n_dropped, rows.n_split) == (1, 0)
    targets = sorted(rows.targets[rows.targets != -100].tolist())
    assert targets == [4, 5, 7, 8]
    for k in (1, 2):
        t = rows.targets_at(k)
        assert all(rows.token_mask[r, i + k + 1] for r, i in (t != -100).nonzero().tolist())
    assert sorted(rows.targets_at(1)[rows.targets_at(1) != -100].tolist()) == [4, 5, 8]
    rows = pack_chat(convs, seq_len=8, drop_long=False)
    assert rows.n_split == 1


def test_shifted_targets_edges():
    ids = torch.arange(4).view(1, 4)
    same = torch.zeros(1, 4, dtype=torch.long)
    assert shifted_targets(ids, same, 0).tolist() == [[1, 2, 3, -100]]
    assert shifted_targets(ids, same, 2).tolist() == [[3, -100, -100, -100]]
    assert shifted_targets(ids, same, 5).tolist() == [[-100] * 4]
    assert shifted_targets(ids, torch.tensor([[0, 0, 1, 1]]), 0).tolist() == [[1, -100, 3, -100]]
    with pytest.raises(ValueError):
        shifted_targets(ids, same, -1)
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([[1]], seq_len=1)


def test_tokenize_documents_text_and_chat():
    class Tok:
        bos_id, eos_id = 0, 1

        def encode(self, text, add_bos=False):
            return [0] * add_bos + [ord(c) for c in text]

        def encode_chat(self, messages):
            return [0, 7, 8, 1], [0, 0, 1, 1]

    out = tokenize_documents(["ab", [{"role": "user", "content": "x"}]], Tok())
    assert out == [([0, 97, 98, 1], [1, 1, 1, 1]), ([0, 7, 8, 1], [0, 0, 1, 1])]


def test_packed_rows_match_unpacked_documents_through_the_model():
    from nanoseek.config import ModelConfig
    from nanoseek.model import Transformer, document_mask

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (7, 5, 9, 3)]
    rows = pack_documents(docs, seq_len=12)
    # Each document alone, right-padded into one batch (causal: padding after it changes nothing).
    alone_ids = torch.tensor([d + [0] * (9 - len(d)) for d in docs])
    with torch.no_grad():
        packed = model(rows.input_ids, positions=rows.positions, mask=document_mask(rows.doc_ids))
        alone = model(alone_ids)
    for r in range(len(rows)):
        for d in rows.doc_ids[r].unique().tolist():
            if d != PAD_DOC:
                sel = rows.doc_ids[r] == d
                torch.testing.assert_close(packed[r][sel], alone[d, : len(docs[d])], atol=1e-4, rtol=1e-4)
