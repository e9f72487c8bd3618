"""AdamW parameter groups and the two learning-rate schedules at their landmarks."""

import math

import pytest

from nanoseek import ModelConfig, Transformer
from nanoseek.train.optim import build_adamw, param_groups, set_lr, warmup_cosine, warmup_stable_decay


def test_param_groups_decay_matrices_only():
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=64, num_hidden_layers=2))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 or "embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert any("embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert any("experts.gate_proj" in names[id(p)] for p in decay["params"])  # stacked 3-D experts decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_adamw(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)
    set_lr(opt, 5e-4)
    assert all(g["lr"] == 5e-4 for g in opt.param_groups)


def test_warmup_cosine_landmarks():
    total, warm = 110, 10
    assert warmup_cosine(0, total, warm) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(60, total, warm, min_ratio=0.1) == pytest.approx(0.55)  # halfway down the cosine
    assert warmup_cosine(110, total, warm, min_ratio=0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, total, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_stable_decay_landmarks():
    total, warm = 100, 10
    assert warmup_stable_decay(4, total, warm) == pytest.approx(0.5)
    assert all(warmup_stable_decay(s, total, warm, decay_fraction=0.2) == 1.0 for s in range(10, 80))
    assert warmup_stable_decay(89, total, warm, min_ratio=0.0, decay_fraction=0.2) == pytest.approx(0.5)
    assert warmup_stable_decay(99, total, warm, min_ratio=0.1, decay_fraction=0.2) == pytest.approx(0.1)
    assert not math.isnan(warmup_stable_decay(0, 1, 0))
