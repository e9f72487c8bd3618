"""The HF key mapping (hf/keys.py): experts split and stacked, MTP layers, tied head, quantized keys.
(The package-wide import rules are tests/test_layout.py's.)"""

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.hf.keys import (EXPERT_KEY, has_mtp_layers, hf_keys, hf_state_dict, is_mtp_shared_copy, mtp_prefixes,
                              natural_key, quantized_keys)


def tiny(**kw):
    return Transformer(ModelConfig.preset("tiny").replace(**kw))


def test_experts_split_per_expert_and_mtp_copies_added():
    model = tiny()
    cfg = model.config
    sd = hf_state_dict(model)
    E = cfg.n_routed_experts
    stacked = model.model.layers[1].mlp.experts.up_proj
    for e in range(E):
        assert torch.equal(sd[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], stacked[e])
    assert "model.layers.1.mlp.experts.up_proj" not in sd
    n = cfg.num_hidden_layers
    assert mtp_prefixes(cfg) == (f"model.layers.{n}.",)
    assert torch.equal(sd[f"model.layers.{n}.shared_head.head.weight"], model.lm_head.weight)
    assert is_mtp_shared_copy(cfg, f"model.layers.{n}.embed_tokens.weight")
    assert not is_mtp_shared_copy(cfg, "model.embed_tokens.weight")
    # every key but the MTP layers' shared copies is one a loader expects
    assert set(hf_keys(model)) == {k for k in sd if not is_mtp_shared_copy(cfg, k)}
    assert has_mtp_layers(cfg, sd) and not has_mtp_layers(cfg, [k for k in sd if not k.startswith(f"model.layers.{n}.")])
    m = EXPERT_KEY.match("model.layers.3.mlp.experts.12.down_proj.weight")
    assert (m[1], m[2], m[3]) == ("model.layers.3.mlp.experts", "12", "down_proj")


def test_tied_head_is_not_written():
    model = tiny(tie_word_embeddings=True, num_nextn_predict_layers=0)
    assert "lm_head.weight" not in hf_state_dict(model) and "lm_head.weight" not in hf_keys(model)


def test_quantized_keys_follow_keep_and_the_head():
    cfg = tiny().config
    keys = quantized_keys(cfg, ["embed_tokens", "gate", "kv_b_proj"])
    n = cfg.num_hidden_layers
    assert "lm_head.weight" in keys and f"model.layers.{n}.shared_head.head.weight" in keys
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
    assert not [k for k in keys if "kv_b_proj" in k or ".mlp.gate." in k or "embed" in k or "norm" in k]
    kept_head = quantized_keys(cfg, ["lm_head"])
    assert "lm_head.weight" not in kept_head and f"model.layers.{n}.shared_head.head.weight" not in kept_head


def test_natural_key_orders_numbers_as_numbers():
    keys = ["model.layers.10.x", "model.layers.2.x", "model.layers.1.x"]
    assert sorted(keys, key=natural_key) == ["model.layers.1.x", "model.layers.2.x", "model.layers.10.x"]
