"""`nanoseek estimate`: DeepSeek-V3's published sizes from its config alone."""

from nanoseek import ModelConfig
from nanoseek.cli import main
from nanoseek.estimate import estimate


def test_deepseek_v3_published_figures():
    e = estimate(ModelConfig.preset("deepseek-v3"))
    assert abs(e.total_params_no_mtp / 1e9 - 671) < 1  # "671B total parameters"
    assert abs((e.total_params + e.mtp_stored_copies) / 1e9 - 685) < 1  # "685B" on the model card, MTP included
    assert abs(e.active_params / 1e9 - 37) < 1  # "37B activated for each token"
    assert e.kv_cache_bytes_per_token == 70_272  # (512 + 64) x 61 layers x 2 bytes
    assert e.mha_cache_bytes_per_token > 50 * e.kv_cache_bytes_per_token


def test_cli_prints_report(capsys):
    assert main(["estimate", "--preset", "deepseek-v3", "--context", "1000"]) == 0
    out = capsys.readouterr().out
    assert "70,272 bytes/token" in out and "active per token: 37.55B" in out and "int4" in out


# The parameter counts on each model card (Hugging Face's safetensors count), in billions.
PUBLISHED = {"r1-distill-qwen-1.5b": 1.78, "r1-distill-qwen-7b": 7.62, "r1-distill-qwen-14b": 14.8,
             "r1-distill-qwen-32b": 32.8, "r1-distill-llama-8b": 8.03, "r1-distill-llama-70b": 70.6,
             "deepseek-llm-7b": 6.91, "deepseek-llm-67b": 67.4, "deepseek-coder-1.3b": 1.35,
             "deepseek-coder-6.7b": 6.74, "deepseek-coder-33b": 33.3, "deepseek-moe-16b": 16.4}


def test_every_published_family_size_within_one_percent():
    for name, billions in PUBLISHED.items():
        e = estimate(ModelConfig.preset(name))
        assert abs(e.total_params / 1e9 / billions - 1) < 0.01, name
    moe = estimate(ModelConfig.preset("deepseek-moe-16b"))
    assert abs(moe.active_params / 1e9 / 2.8 - 1) < 0.02  # "2.8B activated parameters"
    assert estimate(ModelConfig.preset("r1-distill-llama-8b")).kv_cache_bytes_per_token == 2 * 8 * 128 * 32 * 2


def test_cli_reports_a_gqa_cache(capsys):
    assert main(["estimate", "--preset", "r1-distill-qwen-1.5b", "--context", "1000"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1.78B total\n" in out and "GQA: K/V of 2 key/value heads" in out and "28,672 bytes/token" in out


def test_per_rank_training_memory_divides_by_the_layout():
    from nanoseek.config import PRESETS
    from nanoseek.estimate import parallel_report, rank_memory
    cfg = ModelConfig.preset("deepseek-v2-lite")
    one, e = rank_memory(cfg, 1, fsdp=False), estimate(cfg)
    assert one.weights + one.grads + one.optimizer == e.training_bytes()  # 16 B/param, as the report says
    fsdp = rank_memory(cfg, 8, fsdp=True)
    assert fsdp.optimizer == one.optimizer / 8 and fsdp.activations == one.activations
    ep = rank_memory(cfg, 8, ep=8, fsdp=False)  # replicated dense part, an eighth of the routed experts
    assert ep.weights == 4 * (e.total_params - e.expert_params + e.expert_params / 8)
    assert rank_memory(cfg, 1, fsdp=False, checkpointing=True).activations < one.activations / 5
    for name in PRESETS:  # every preset, dense ones included
        assert "FSDP" in parallel_report(ModelConfig.preset(name), world=4)


def test_cli_prints_per_rank_memory(capsys):
    assert main(["estimate", "--preset", "deepseek-v3", "--world", "64", "--ep", "8", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "per-rank training memory, 64 ranks" in out and "FSDP + EP 8" in out and "replicated" not in out


def test_deepseek_v4_published_sizes_and_compressed_cache():
    flash, pro = (estimate(ModelConfig.preset(n)) for n in ("deepseek-v4-flash", "deepseek-v4-pro"))
    assert abs(flash.total_params_no_mtp / 1e9 / 284 - 1) < 0.01  # "284B total parameters"
    assert abs(pro.total_params_no_mtp / 1e12 / 1.6 - 1) < 0.02  # "1.6T"
    assert abs(pro.active_params / 1e9 / 49 - 1) < 0.03  # "49B activated"
    cfg = ModelConfig.preset("deepseek-v4-flash")  # 21 CSA layers of (512 + 128) / 4, 20 HCA of 512 / 128, bf16
    assert flash.kv_cache_bytes_per_token == round(2 * (21 * 640 / 4 + 20 * 512 / 128)) == cfg.cache_bytes_per_token(2)
    assert flash.mtp_stored_copies == 0


def test_v4_decode_cost_grows_with_the_compressed_entries_only(capsys):
    from nanoseek.estimate import v4_decode_cost
    cfg = ModelConfig.preset("deepseek-v4-flash")
    (r1, f1), (r2, f2) = v4_decode_cost(cfg, 1 << 19), v4_decode_cost(cfg, 1 << 20)
    hca, csa = 20, 21  # doubling the context adds the HCA entries and CSA indexer keys, not the top-k entries
    assert r2 - r1 == 2 * (hca * (1 << 19) // 128 * 512 + csa * (1 << 19) // 4 * 128)
    assert f2 > f1
    assert main(["estimate", "--preset", "deepseek-v4-flash"]) == 0
    out = capsys.readouterr().out
    assert "at 1024k context a decode step reads" in out and "6,880 bytes/token" in out
