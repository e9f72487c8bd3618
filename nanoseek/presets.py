"""Named configs: every published DeepSeek shape, and tiny ones for tests and the demo.

Each entry is ``ModelConfig.family`` keywords: ``ModelConfig.preset(name)`` builds it, and
``from_spec("name:field=value")`` starts a student's shape from it. Values come from each model's
published config.json.
"""

PRESETS: dict[str, dict] = {
    # A forward pass in milliseconds on a CPU: MLA with q compression, 1 dense + 3 MoE layers,
    # 8 routed experts in 2 groups, sigmoid + noaux_tc routing, one MTP module.
    "tiny": dict(model_type="deepseek_v3", vocab_size=1024, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
                 moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 n_group=2, topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc",
                 norm_topk_prob=True, routed_scaling_factor=1.0, num_nextn_predict_layers=1,
                 max_position_embeddings=1024),
    # DeepSeek-V2-Lite (16B total, 2.4B active), from its published config.json.
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
                             intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, first_k_dense_replace=1, moe_intermediate_size=1408,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
                             topk_group=1, scoring_func="softmax", topk_method="greedy",
                             norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
                             max_position_embeddings=163840, rope_theta=10000.0, rope_type="yarn",
                             rope_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                             beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707, bos_token_id=100000,
                             eos_token_id=100001),
    # DeepSeek-V3 / R1 (671B total, 37B active, +14B MTP), from its published config.json.
    "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
                        intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, first_k_dense_replace=3, moe_intermediate_size=2048,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                        topk_group=4, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                        max_position_embeddings=163840, rope_theta=10000.0, rope_type="yarn",
                        rope_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, bos_token_id=0, eos_token_id=1),
    # The dense and first-MoE releases, from their published config.json files. Parameter counts
    # (tests/test_estimate.py) are within 1% of the model cards'.
    **{f"r1-distill-qwen-{size}": dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden,
                                       intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=kv, max_position_embeddings=131072, rms_norm_eps=eps,
                                       rope_theta=theta, bos_token_id=151646, eos_token_id=151643,
                                       extra=dict(use_sliding_window=False, sliding_window=4096,
                                                  max_window_layers=window))
       for size, vocab, hidden, inter, layers, heads, kv, eps, theta, window in [
           ("1.5b", 151936, 1536, 8960, 28, 12, 2, 1e-6, 10000.0, 21),
           ("7b", 152064, 3584, 18944, 28, 28, 4, 1e-6, 10000.0, 28),
           ("14b", 152064, 5120, 13824, 48, 40, 8, 1e-5, 1000000.0, 48),
           ("32b", 152064, 5120, 27648, 64, 40, 8, 1e-5, 1000000.0, 64)]},
    **{f"r1-distill-llama-{size}": dict(model_type="llama", vocab_size=128256, hidden_size=hidden,
                                        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                        rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192, bos_token_id=128000,
                                        eos_token_id=128001)
       for size, hidden, inter, layers, heads in [("8b", 4096, 14336, 32, 32), ("70b", 8192, 28672, 80, 64)]},
    **{f"deepseek-llm-{size}": dict(model_type="llama", vocab_size=102400, hidden_size=hidden,
                                    intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, max_position_embeddings=4096, rms_norm_eps=1e-6,
                                    bos_token_id=100000, eos_token_id=100001)
       for size, hidden, inter, layers, heads, kv in [("7b", 4096, 11008, 30, 32, 32),
                                                       ("67b", 8192, 22016, 95, 64, 8)]},
    **{f"deepseek-coder-{size}": dict(model_type="llama", vocab_size=32256, hidden_size=hidden,
                                      intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv, max_position_embeddings=16384, rms_norm_eps=1e-6,
                                      rope_theta=100000.0, rope_type="linear", rope_factor=4.0,
                                      bos_token_id=32013, eos_token_id=32014)
       for size, hidden, inter, layers, heads, kv in [("1.3b", 2048, 5504, 24, 16, 16),
                                                       ("6.7b", 4096, 11008, 32, 32, 32),
                                                       ("33b", 7168, 19200, 62, 56, 8)]},
    # DeepSeekMoE-16B: multi-head attention, 1 dense layer, then 64 routed (6 per token) + 2 shared experts.
    "deepseek-moe-16b": dict(model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                             max_position_embeddings=4096, rms_norm_eps=1e-6, moe_intermediate_size=1408,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             first_k_dense_replace=1, moe_layer_freq=1, bos_token_id=100000, eos_token_id=100001),
    # Tiny dense students for tests and the demo's distillation: Qwen2's layout (q/k/v biases), GQA.
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=0, eos_token_id=1),
}
# DeepSeek-V3.2(-Exp): V3 plus the lightning indexer (its config.json); tiny-v32: `tiny` with DSA at a small k.
PRESETS["deepseek-v3.2"] = dict(PRESETS["deepseek-v3"], model_type="deepseek_v32", index_topk=2048,
                                index_head_dim=128, index_n_heads=64)
PRESETS["tiny-v32"] = dict(PRESETS["tiny"], model_type="deepseek_v32", index_topk=16, index_head_dim=32,
                           index_n_heads=4)
# DeepSeek-V4 (DeepSeek-V4 report §2; published config.json files): V4-Flash (284B total, 13B active) opens
# with two window-only layers, V4-Pro with two HCA layers, then CSA and HCA alternate; one MTP layer
# (window only). tiny-v4: every layer type and hash routing at test sizes, HCA every 16 tokens.
_V4 = dict(model_type="deepseek_v4", vocab_size=129280, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64,
           o_lora_rank=1024, n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus",
           topk_method="noaux_tc", norm_topk_prob=True, max_position_embeddings=1048576, rope_theta=10000.0,
           compress_rope_theta=160000.0, rope_type="yarn", rope_factor=16.0, original_max_position_embeddings=65536,
           beta_fast=32.0, beta_slow=1.0, window_size=128, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
           num_hash_layers=3, swiglu_limit=10.0, index_n_heads=64, index_head_dim=128, num_nextn_predict_layers=1,
           rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
PRESETS["deepseek-v4-flash"] = dict(_V4, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
                                    num_attention_heads=64, q_lora_rank=1024, o_groups=8, n_routed_experts=256,
                                    routed_scaling_factor=1.5, index_topk=512,
                                    compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [0])
PRESETS["deepseek-v4-pro"] = dict(_V4, hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61,
                                  num_attention_heads=128, q_lora_rank=1536, o_groups=16, n_routed_experts=384,
                                  routed_scaling_factor=2.5, index_topk=1024,
                                  compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0])
PRESETS["tiny-v4"] = dict(_V4, vocab_size=1024, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2,
                          o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
                          index_head_dim=16, index_n_heads=8, index_topk=4, window_size=8, hc_mult=2, num_hash_layers=1,
                          max_position_embeddings=4096, original_max_position_embeddings=256,
                          compress_ratios=[0, 4, 16, 4, 0])
