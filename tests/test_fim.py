"""FIM: PSM and SPM layouts with DeepSeek-Coder's sentinels, applied at the given rate."""

import random

import pytest

from nanoseek.data.fim import fim_split, fim_transform, psm, spm
from nanoseek.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE

TEXT = "def add(a, b):\n    return a + b\n# 日本 ünïcode\n"


def _parse_psm(s):
    assert s.startswith(FIM_BEGIN) and s.count(FIM_HOLE) == 1 and s.count(FIM_END) == 1
    prefix, rest = s[len(FIM_BEGIN):].split(FIM_HOLE)
    suffix, middle = rest.split(FIM_END)
    return prefix, middle, suffix


def test_psm_layout():
    for seed in range(20):
        out = fim_transform(TEXT, rate=1.0, rng=random.Random(seed), spm_rate=0.0)
        prefix, middle, suffix = _parse_psm(out)
        assert prefix + middle + suffix == TEXT
    assert psm("P", "M", "S") == f"{FIM_BEGIN}P{FIM_HOLE}S{FIM_END}M"


def test_spm_layout():
    for seed in range(20):
        out = fim_transform(TEXT, rate=1.0, rng=random.Random(seed), spm_rate=1.0)
        assert out.startswith(FIM_BEGIN + FIM_HOLE)
        suffix, prefix_middle = out[len(FIM_BEGIN + FIM_HOLE):].split(FIM_END)
        assert prefix_middle + suffix == TEXT
    assert spm("P", "M", "S") == f"{FIM_BEGIN}{FIM_HOLE}S{FIM_END}PM"


def test_rate_and_reproducibility():
    assert fim_transform(TEXT, rate=0.0, rng=random.Random(0)) == TEXT
    outs = [fim_transform(TEXT, 0.5, random.Random(1)) for _ in range(2)]
    assert outs[0] == outs[1]
    rng = random.Random(0)
    outs = [fim_transform(TEXT, 0.5, rng) for _ in range(400)]
    fim = [o for o in outs if o != TEXT]
    assert 150 < len(fim) < 250
    spm_count = sum(o.startswith(FIM_BEGIN + FIM_HOLE) for o in fim)
    assert 0.3 * len(fim) < spm_count < 0.7 * len(fim)


def test_split_covers_text_and_validates():
    rng = random.Random(0)
    for _ in range(50):
        assert "".join(fim_split(TEXT, rng)) == TEXT
    assert fim_split("", rng) == ("", "", "")
    with pytest.raises(ValueError, match="rate"):
        fim_transform(TEXT, 1.5, rng)
