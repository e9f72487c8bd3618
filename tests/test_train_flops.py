"""FLOPs per token and the kept matmul peak behind MFU."""

import json

import pytest
import torch
from test_train_loop import micro_model

from nanoseek.train import flops
from nanoseek.train.flops import mfu, training_flops_per_token


def test_flops_per_token_counts_active_weights_and_attention():
    model = micro_model()
    cfg = model.config
    f_short, f_long = training_flops_per_token(model, 32), training_flops_per_token(model, 64)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert f_long - f_short == pytest.approx(6 * layers * cfg.num_attention_heads
                                             * (cfg.qk_head_dim + cfg.v_head_dim) * 32)
    assert f_short > 6 * model.num_params(active=True) - 6 * model.model.embed_tokens.weight.numel()


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(1e6, tokens=1000, seconds=2.0, peak=1e9) == pytest.approx(0.5)


def test_matmul_peak_is_the_best_ever_measured(tmp_path, monkeypatch):
    """A peak measured on a busy machine comes out low; the kept best keeps MFU from passing 100%."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for measured, expected in [(2e12, 2e12), (5e11, 2e12), (3e12, 3e12)]:
        flops.matmul_peak_flops.cache_clear()
        monkeypatch.setattr(flops, "_measure_matmul_flops", lambda device, dtype, m=measured: m)
        assert flops.matmul_peak_flops("cpu", torch.bfloat16) == expected
    kept = json.loads((tmp_path / "nanoseek" / "matmul_peak.json").read_text())
    assert list(kept.values()) == [3e12] and "bfloat16" in next(iter(kept))
    flops.matmul_peak_flops.cache_clear()
