"""Aux-loss-free balancing: the bias rule by hand, a skewed router driven toward uniform load,
load counting that skips padding, and the router-collapse warning."""

import warnings

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train.balance import (CollapseMonitor, RouterCollapseWarning, load_max_over_mean, moe_layer_ids,
                                    step_loads, update_expert_bias)


def tiny_model(**kw):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                             num_nextn_predict_layers=0, **kw)
    return Transformer(cfg).train()


def test_bias_rule_by_hand():
    model = tiny_model()
    loads = torch.tensor([[3, 1, 0, 4, 2, 2, 2, 2]])  # mean 2
    update_expert_bias(model, loads, gamma=0.5)
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert bias.tolist() == [-0.5, 0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    update_expert_bias(model, loads, gamma=0.0)  # disabled: unchanged
    assert bias.tolist() == [-0.5, 0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]


def test_bias_update_moves_a_skewed_router_toward_uniform_load():
    torch.manual_seed(0)
    model = tiny_model()
    moe = model.moe_layers()[0]
    ids = torch.randint(0, 64, (4, 32))
    seen = {}
    moe.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        model.forward_hidden(ids)
        # Skew the router: experts 0 and 1 get a large component along the tokens' mean direction.
        direction = seen["x"].reshape(-1, 64).mean(0)
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[:2] += 3 * direction / direction.norm()
    ratios = []
    for _ in range(60):
        with torch.no_grad():
            moe(seen["x"])  # the MoE layer alone on fixed inputs: only routing matters here
        loads = step_loads(model)
        ratios.append(load_max_over_mean(loads)[0].item())
        update_expert_bias(model, loads, gamma=0.01)  # no gradient steps: only the bias moves
    assert ratios[0] > 3.0  # experts 0 and 1 take most tokens (the maximum is E/K = 4)
    late = sum(ratios[-10:]) / 10
    assert late < 2.0 and late < ratios[0] / 1.8


def test_step_loads_count_only_valid_tokens():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 8))
    model.forward_hidden(ids)
    all_loads = step_loads(model)
    assert all_loads.sum().item() == 2 * 8 * 2  # tokens x K per layer
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[0, :3] = True
    assert step_loads(model, valid).sum().item() == 3 * 2
    assert moe_layer_ids(model) == [1]


def test_bias_rule_skips_routers_without_bias():
    model = tiny_model(model_type="deepseek_v2", topk_method="greedy", scoring_func="softmax", n_group=1,
                       topk_group=1)
    update_expert_bias(model, torch.tensor([[5, 0, 0, 0, 0, 0, 0, 0]]), gamma=0.1)  # nothing to update
    assert model.moe_layers()[0].gate.e_score_correction_bias is None


def test_collapse_monitor_warns_once_per_episode():
    monitor = CollapseMonitor([1, 2], window=3)
    balanced = torch.tensor([[4] * 8, [4] * 8])
    collapsed = torch.tensor([[16, 16, 0, 0, 0, 0, 0, 0], [4] * 8])  # layer 1: 6 of 8 experts starve
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while the window still holds balanced steps
        assert monitor.update(1, balanced) == []
        assert monitor.update(2, collapsed) == []
        assert monitor.update(3, collapsed) == []
    with pytest.warns(RouterCollapseWarning, match="step 4: router collapse in layer 1: 6 of 8 experts"):
        assert monitor.update(4, collapsed) == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # still collapsed: no second warning
        assert monitor.update(5, collapsed) == [1]
        for step in range(6, 9):
            monitor.update(step, balanced)
    assert monitor.collapsed == set()
    with pytest.warns(RouterCollapseWarning):  # a new episode warns again
        for step in range(9, 12):
            monitor.update(step, collapsed)
