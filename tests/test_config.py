"""ModelConfig: presets, both config.json spellings, model-type defaults, validation."""

import json

import pytest

from nanoseek import ModelConfig

V3_PUBLISHED = {  # the shape of DeepSeek-V3's published config.json (abridged sizes)
    "architectures": ["DeepseekV3ForCausalLM"], "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_nextn_predict_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 16, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16,
    "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001,
    "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02,
    "rms_norm_eps": 1e-06, "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "pretraining_tp": 1,
    "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_published_v3_spelling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_PUBLISHED))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.rope_type == "yarn" and cfg.rope_factor == 40 and cfg.original_max_position_embeddings == 4096
    assert cfg.quantization_config["quant_method"] == "fp8" and cfg.torch_dtype == "bfloat16"
    assert cfg.extra["seq_aux"] is True  # unknown keys kept, written back
    out = cfg.to_hf()
    assert out["seq_aux"] is True and "auto_map" not in out  # never point at remote code
    assert ModelConfig.from_hf(out) == cfg


def test_new_rope_parameters_spelling_equals_old():
    new = dict(V3_PUBLISHED)
    rope = dict(new.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = new.pop("rope_theta")
    new["rope_parameters"] = rope
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(V3_PUBLISHED)


def test_model_type_defaults():
    base = {k: V3_PUBLISHED[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                         "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "q_lora_rank",
                                         "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_routed_experts",
                                         "num_experts_per_tok")}
    v2 = ModelConfig.from_hf(dict(base, model_type="deepseek_v2", n_group=None, topk_group=None))
    assert (v2.scoring_func, v2.topk_method, v2.norm_topk_prob) == ("softmax", "greedy", False)
    v3 = ModelConfig.from_hf(dict(base, model_type="deepseek_v3", n_group=4, topk_group=2))
    assert (v3.scoring_func, v3.topk_method, v3.norm_topk_prob) == ("sigmoid", "noaux_tc", True)
    assert ModelConfig.from_hf(dict(base, model_type="deepseek_v2", q_lora_rank=None)).q_lora_rank is None


@pytest.mark.parametrize("field,value,match", [
    ("n_group", 3, "n_group=3.*must divide n_routed_experts=8"),
    ("topk_group", 3, "topk_group=3.*between 1 and n_group=2"),
    ("num_experts_per_tok", 5, "num_experts_per_tok=5.*4 experts the chosen groups hold"),
    ("hidden_size", -8, "hidden_size=-8.*positive"),
    ("scoring_func", "relu", "scoring_func='relu'"),
    ("model_type", "gpt2", "model_type='gpt2'.*unknown"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim=7.*even"),
])
def test_invalid_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("tiny").replace(**{field: value})


def test_from_hf_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(V3_PUBLISHED, model_type="gpt2")))
    with pytest.raises(ValueError, match=r"config\.json.*model_type='gpt2'"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(dict(V3_PUBLISHED, n_group=5)))
    with pytest.raises(ValueError, match=r"config\.json.*n_group=5"):
        ModelConfig.from_hf(tmp_path)


def test_presets():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("gpt2")
    lite = ModelConfig.preset("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax"
    assert ModelConfig.from_hf(lite.to_hf()) == lite


# Shapes of the published config.json files (R1-Distill-Llama-8B, R1-Distill-Qwen-1.5B, DeepSeek-Coder-6.7B,
# DeepSeekMoE-16B), the keys each family writes.
R1_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
            "use_cache": True}
R1_QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
           "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
           "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000,
           "rope_scaling": None, "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 21,
           "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643, "use_mrope": False}
CODER = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32256, "hidden_size": 4096,
         "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
         "max_position_embeddings": 16384, "rms_norm_eps": 1e-6, "rope_theta": 100000,
         "rope_scaling": {"factor": 4.0, "type": "linear"}, "bos_token_id": 32013, "eos_token_id": 32014}
MOE_16B = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 102400,
           "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 28,
           "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
           "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
           "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": None, "attention_bias": False,
           "bos_token_id": 100000, "eos_token_id": 100001,
           "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"}}


@pytest.mark.parametrize("published,preset", [(R1_LLAMA, "r1-distill-llama-8b"), (R1_QWEN, "r1-distill-qwen-1.5b"),
                                              (CODER, "deepseek-coder-6.7b"), (MOE_16B, "deepseek-moe-16b")],
                         ids=["r1-llama", "r1-qwen", "coder", "moe-16b"])
def test_family_configs_read_write_back_and_match_presets(published, preset):
    cfg = ModelConfig.from_hf(published)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    out = cfg.to_hf()
    for key, value in published.items():  # every published key written back (remote-code auto_map aside)
        if key != "auto_map":
            assert out[key] == value or (key == "rope_scaling" and value and
                                         value.get("type") == out[key]["rope_type"]), key
    assert "kv_lora_rank" not in out and "q_lora_rank" not in out  # no other family's fields
    p = ModelConfig.preset(preset)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "kv_heads", "rope_type", "rope_factor", "rope_theta", "n_routed_experts", "first_k_dense_replace"):
        assert getattr(p, name) == getattr(cfg, name), name


def test_family_properties():
    qwen, llama, moe = (ModelConfig.from_hf(c) for c in (R1_QWEN, R1_LLAMA, MOE_16B))
    assert (qwen.attention, qwen.qkv_bias, qwen.kv_heads, qwen.attention_head_dim) == ("gqa", True, 2, 128)
    assert not llama.qkv_bias and llama.rope_type == "llama3" and llama.original_max_position_embeddings == 8192
    assert not qwen.has_moe and moe.has_moe and not moe.is_moe_layer(0) and moe.is_moe_layer(27)
    assert (moe.scoring_func, moe.topk_method, moe.num_nextn_predict_layers) == ("softmax", "greedy", 0)
    assert qwen.extra["max_window_layers"] == 21 and moe.extra["seq_aux"] is True
    assert qwen.softmax_scale == 128 ** -0.5 and qwen.cache_width == 2 * 2 * 128


@pytest.mark.parametrize("change,match", [
    (dict(use_sliding_window=True), "use_sliding_window=True is not supported"),
    (dict(num_key_value_heads=5), "num_key_value_heads=5.*must divide num_attention_heads=12"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(mlp_bias=True), "mlp_bias=True"),
])
def test_family_configs_refuse_what_is_not_built(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(dict(R1_QWEN, **change))


def test_family_constructor_and_student_spec():
    with pytest.raises(ValueError, match="n_routed_experts=8: llama models are dense.*ModelConfig.family"):
        ModelConfig(model_type="llama")
    cfg = ModelConfig.from_spec("qwen2:hidden=64,layers=2,heads=4,kv_heads=2,inter=128,tie=true",
                                vocab_size=300, eos_token_id=7)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.kv_heads, cfg.intermediate_size,
            cfg.tie_word_embeddings, cfg.vocab_size, cfg.eos_token_id) == ("qwen2", 64, 2, 2, 128, True, 300, 7)
    assert ModelConfig.from_spec("llama:hidden_size=64,num_attention_heads=2").num_attention_heads == 2
    with pytest.raises(ValueError, match="'width=3' is not field=value"):
        ModelConfig.from_spec("qwen2:width=3")
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        ModelConfig.from_spec("gpt2:hidden=64")
