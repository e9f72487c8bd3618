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
