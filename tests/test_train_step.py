"""The optimizer step every loop shares (clip, finite check, lr, step, zero) and the metrics log."""

import json
import math

import pytest
import torch
from torch import nn

from nanoseek.train.step import MetricsLog, optimizer_step


def _model_with_grad(scale: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    model(torch.randn(3, 4)).sum().mul(scale).backward()
    return model, torch.optim.SGD(model.parameters(), lr=0.0)


def test_step_clips_sets_lr_steps_and_clears_gradients():
    model, opt = _model_with_grad(100.0)
    before = [p.detach().clone() for p in model.parameters()]
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    clipped = [p.grad.clone() * (1.0 / (norm + 1e-6)) for p in model.parameters()]
    assert optimizer_step(model, opt, lr=0.5, grad_clip=1.0) == pytest.approx(norm, rel=1e-5)
    assert opt.param_groups[0]["lr"] == 0.5
    for p, b, g in zip(model.parameters(), before, clipped):
        assert torch.allclose(p, b - 0.5 * g, atol=1e-6) and p.grad is None


def test_no_clipping_at_zero():
    model, opt = _model_with_grad(100.0)
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer_step(model, opt, lr=0.1, grad_clip=0.0)
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p, b - 0.1 * g)


@pytest.mark.parametrize("scale, loss, match", [(float("nan"), None, "gradient norm nan"),
                                                (1.0, float("inf"), "loss inf")])
def test_a_non_finite_step_stops_before_touching_the_weights(scale, loss, match):
    model, opt = _model_with_grad(scale)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=f"step 7: {match}"):
        optimizer_step(model, opt, lr=0.1, grad_clip=1.0, loss=loss, where="step 7")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_metrics_log_appends_one_row_per_call_on_the_main_process(tmp_path):
    MetricsLog(tmp_path / "metrics.jsonl").append({"step": 1, "loss": 2.5})
    MetricsLog(tmp_path / "metrics.jsonl").append({"step": 2, "loss": 2.0})
    MetricsLog(tmp_path / "metrics.jsonl", enabled=False).append({"step": 3})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
