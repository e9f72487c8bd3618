"""The shared training loop: a tiny model overfits a small batch, gradient accumulation equals one
big batch, the logs and plots it writes, and clear errors for rows it cannot train on."""

import json
from types import SimpleNamespace

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data import pack_documents
from nanoseek.train.loop import TrainConfig, train

VOCAB = 48


def micro_model(seed: int = 0) -> Transformer:
    """The tiny preset cut down further: 2 layers (dense + MoE), hidden 64, one MTP module."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                          intermediate_size=128, moe_intermediate_size=32))


def micro_rows(n_docs: int = 8, seed: int = 0, seq_len: int = 32):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, VOCAB, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_docs)]
    return pack_documents(docs, seq_len=seq_len, eos_id=1, pad_id=0)


def quiet(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "warmup_steps": 2, **kw})


def read(path):
    return [json.loads(line) for line in open(path)]


def test_tiny_model_overfits_a_small_batch(tmp_path):
    rows = micro_rows(n_docs=6)
    cfg = quiet(steps=60, batch_size=len(rows), micro_batch_size=len(rows), lr=1e-2, weight_decay=0.0)
    train(micro_model(), rows, cfg, tmp_path)
    losses = [r["loss"] for r in read(tmp_path / "metrics.jsonl")]
    assert losses[0] > 3.0  # ~ln(48) at the start
    assert losses[-1] < 0.5, f"did not overfit: final loss {losses[-1]:.3f}"


def test_accumulation_and_one_big_batch_give_the_same_run(tmp_path):
    rows = micro_rows(n_docs=16)
    runs = []
    for micro in (4, 2):
        out = tmp_path / f"micro{micro}"
        train(micro_model(), rows, quiet(steps=3, batch_size=4, micro_batch_size=micro), out)
        runs.append(read(out / "metrics.jsonl"))
    for a, b in zip(*runs):
        for key in ("loss", "mtp_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_metrics_rows_and_plots(tmp_path):
    rows = micro_rows()
    train(micro_model(), rows, quiet(steps=2, batch_size=2, micro_batch_size=2), tmp_path)
    metrics = read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2]
    for key in ("loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_load_max_mean", "expert_load"):
        assert key in metrics[-1], key
    assert metrics[-1]["tokens_per_s"] > 0 and 0 < metrics[-1]["mfu"] < 1
    # layer 1 is the MoE layer, layer 2 the MTP module's MoE
    assert set(metrics[-1]["expert_load_max_mean"]) == {"1", "2"}
    assert all(v >= 1.0 for v in metrics[-1]["expert_load_max_mean"].values())
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "expert_load.png").stat().st_size > 0
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()


def _rows(ids, targets=None):
    ids = torch.as_tensor(ids)
    t = torch.as_tensor(targets) if targets is not None else ids.roll(-1, 1)
    return SimpleNamespace(input_ids=ids, doc_ids=torch.zeros_like(ids), targets=t)


@pytest.mark.parametrize("rows, match", [
    (_rows(torch.zeros(0, 8, dtype=torch.long)), "no data"),
    (_rows([[1, 2, VOCAB + 5, 3]]), f"token id {VOCAB + 5} is outside"),
    (_rows([[1, 2, 3, 4]], [[-100] * 4]), "every target is masked"),
])
def test_rows_it_cannot_train_on_are_clear_errors(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        train(micro_model(), rows, quiet(steps=1, batch_size=1, micro_batch_size=1), tmp_path)


def test_bad_config_and_batch_split_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="stop_at"):
        TrainConfig(steps=5, stop_at=9)


def test_a_run_refuses_to_overwrite_an_earlier_one(tmp_path):
    rows = micro_rows()
    cfg = quiet(steps=1, batch_size=2, micro_batch_size=2)
    train(micro_model(), rows, cfg, tmp_path)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(micro_model(), rows, cfg, tmp_path)
