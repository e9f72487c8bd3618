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
