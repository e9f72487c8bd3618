"""Parity of nanoseek's Transformer with transformers' DeepSeek-V2/V3 (the reference)."""

import json
import warnings

import pytest
import torch

from conftest import randomize_, transformers_model
from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.model import MoE, document_mask

transformers = pytest.importorskip("transformers")

V3 = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
          num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
          v_head_dim=12, first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=8,
          n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, scoring_func="sigmoid",
          topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
          rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=32, mscale=0.9,
          mscale_all_dim=0.7, max_position_embeddings=128)
V2 = dict(model_type="deepseek_v2", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
          num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
          v_head_dim=8, first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=8,
          n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2, scoring_func="softmax",
          topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.5,
          num_nextn_predict_layers=0, max_position_embeddings=128)


def hf_logits(path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits, hf


@pytest.mark.parametrize("kw", [V3, V2], ids=["v3", "v2"])
def test_nanoseek_saved_model_matches_transformers(kw, tmp_path):
    model = randomize_(Transformer(ModelConfig(**kw))).eval()
    save_pretrained(model, tmp_path)
    x = torch.randint(0, kw["vocab_size"], (2, 24))
    ref, hf = hf_logits(tmp_path, x)
    assert type(hf).__name__ == ("DeepseekV3ForCausalLM" if kw["model_type"] == "deepseek_v3" else
                                 "DeepseekV2ForCausalLM")
    with torch.no_grad():
        ours = model(x)
    assert (ours - ref).abs().max() < 1e-4
    assert ours.abs().max() > 1e-2  # non-trivial logits


@pytest.mark.parametrize("kw", [V3, V2], ids=["v3", "v2"])
@pytest.mark.parametrize("old_spelling", [False, True])
def test_transformers_saved_model_loads(kw, old_spelling, tmp_path):
    ours = ModelConfig(**kw)
    hf = transformers_model(ours)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if old_spelling:  # the published checkpoints' rope_theta + rope_scaling{type: yarn}
        rope = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
        rtype = rope.pop("rope_type", "default")
        cfg["rope_scaling"] = None if rtype == "default" else dict(rope, type=rtype)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    else:
        assert "rope_parameters" in cfg
    x = torch.randint(0, kw["vocab_size"], (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_pretrained(tmp_path)
    if kw["num_nextn_predict_layers"]:  # transformers does not save MTP layers: loaded with MTP off + warning
        assert model.config.num_nextn_predict_layers == 0
        assert any("MTP" in str(w.message) for w in caught)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() < 1e-4


def test_yarn_scale_and_presets():
    cfg = ModelConfig(**V3)
    # softmax scale carries YaRN's mscale(s, mscale_all_dim)^2
    m = 0.1 * 0.7 * torch.log(torch.tensor(4.0)).item() + 1
    assert cfg.softmax_scale == pytest.approx(16 ** -0.5 * m * m)
    tiny = ModelConfig.preset("tiny")
    model = Transformer(tiny)
    logits = model(torch.randint(0, tiny.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, tiny.vocab_size)
    assert len(model.moe_layers()) == 4  # 3 main MoE layers + the MTP block


def test_forward_train_shapes_and_mtp_alignment():
    cfg = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=2)
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    hidden, mtp = model.forward_train(x)
    assert hidden.shape == (2, 10, cfg.hidden_size) and len(mtp) == 2
    assert all(t.shape == (2, 10, cfg.vocab_size) for t in mtp)
    # main logits equal model(x); MTP depth 1 at position i only sees tokens <= i+1
    torch.testing.assert_close(model.lm_head(hidden), model(x))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % cfg.vocab_size
    _, mtp_y = model.forward_train(y)
    torch.testing.assert_close(mtp_y[0][:, :5], mtp[0][:, :5])
    assert not torch.allclose(mtp_y[0][:, 5], mtp[0][:, 5])


def test_moe_exposes_load_and_scores():
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).train()
    model(torch.randint(0, cfg.vocab_size, (2, 8)))
    moe = model.moe_layers()[0]
    assert isinstance(moe, MoE)
    assert int(moe.load.sum()) == 2 * 8 * cfg.num_experts_per_tok
    assert moe.scores.shape == (2, 8, cfg.n_routed_experts) and moe.scores.requires_grad
    assert moe.indices.shape == (2, 8, cfg.num_experts_per_tok)


def test_bias_steers_choice_not_weights():
    cfg = ModelConfig.preset("tiny")
    moe = Transformer(cfg).moe_layers()[0]
    x = torch.randn(16, cfg.hidden_size)
    w0, i0, s0 = moe.gate(x)
    moe.gate.e_score_correction_bias[3] = 100.0  # expert 3 in group 0: chosen by every token
    w1, i1, s1 = moe.gate(x)
    assert (i1 == 3).any(-1).all()
    torch.testing.assert_close(s0, s1)  # unbiased scores unchanged
    chosen = s1.gather(1, i1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_document_mask_blocks_other_documents():
    cfg = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    model = Transformer(cfg).eval()
    a, b = torch.randint(0, cfg.vocab_size, (1, 5)), torch.randint(0, cfg.vocab_size, (1, 4))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 5 + [1] * 4])
    pos = torch.tensor([list(range(5)) + list(range(4))])
    with torch.no_grad():
        out = model(packed, positions=pos, mask=document_mask(doc))
        torch.testing.assert_close(out[:, 5:], model(b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :5], model(a), atol=1e-5, rtol=1e-5)


def test_meta_device_build_of_real_shapes():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("deepseek-v3"))
    assert abs(model.num_params(include_mtp=False) / 1e9 - 671) < 1
    assert abs(model.num_params(active=True, include_mtp=False) / 1e9 - 37) < 1


def test_grouped_expert_products_equal_the_per_expert_loop():
    """torch._grouped_mm over all experts (the default on CPU) == the per-expert loop, values and gradients."""
    from nanoseek.model import expert_products
    torch.manual_seed(0)
    xs, gates = torch.randn(20, 8, requires_grad=True), torch.rand(20, 1, requires_grad=True)
    weights = [torch.randn(4, 16, 8, requires_grad=True), torch.randn(4, 16, 8, requires_grad=True),
               torch.randn(4, 8, 16, requires_grad=True)]
    counts = [5, 0, 9, 6]  # an expert with no rows too
    outs = [expert_products(xs, gates, counts, *weights, grouped=g) for g in (True, False)]
    grads = [torch.autograd.grad(o.sum(), [xs, gates, *weights]) for o in outs]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
