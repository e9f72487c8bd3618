"""Weight formats (quant/formats.py): round-trip error bounds of every registered format, int4 packing,
FP8 block layout."""

import pytest
import torch

from nanoseek.quant.formats import (FORMATS, error_stats, int4_dequantize, int4_group_size, int4_pack, int4_quantize,
                                    int4_unpack, int8_dequantize, int8_quantize, weight_format)

E4M3_MAX = 448.0


def weight(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(n, k, generator=g)
    w[3] *= 20  # one loud output channel: per-channel scales must not let it spoil the others
    return w


# ----------------------------------------------------------------------------- int8

def test_int8_per_channel_bound():
    w = weight()
    q, scale = int8_quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (w.shape[0],)
    assert int(q.abs().max()) == 127  # each channel's largest magnitude maps to the top code
    assert torch.allclose(scale, w.abs().amax(1) / 127)
    back = int8_dequantize(q, scale)
    # stated bound: every element within half a step of its own channel's scale
    assert ((back - w).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    # Gaussian weights: relative error ~ step / sqrt(12) / std, about 0.6%; stated: under 1%
    assert error_stats(w, back)["rel_error"] < 0.01
    quiet = torch.cat((w[:3], w[4:]))
    assert error_stats(quiet, torch.cat((back[:3], back[4:])))["rel_error"] < 0.01  # the loud row stays its own


def test_int8_zero_row_is_exact():
    w = weight()
    w[5] = 0
    q, scale = int8_quantize(w)
    assert torch.isfinite(scale).all() and (int8_dequantize(q, scale)[5] == 0).all()


# ----------------------------------------------------------------------------- int4

def test_int4_pack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = int4_pack(codes)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(int4_unpack(packed), codes)
    assert torch.equal(packed & 0x0F, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_group_bound(group):
    w = weight()
    packed, scale, wmin = int4_quantize(w, group)
    G = w.shape[1] // group
    assert packed.shape == (96, 128) and scale.shape == (96, G) and wmin.shape == (96, G)
    back = int4_dequantize(packed, scale, wmin)
    step = scale.repeat_interleave(group, 1)
    # stated bound: every element within half a step of its group's (max - min) / 15
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # each group's min and max are representable: codes 0 and 15 land on them
    groups = w.view(96, G, group)
    assert torch.allclose(back.view(96, G, group).amin(-1), groups.amin(-1), atol=1e-6)
    assert torch.allclose(back.view(96, G, group).amax(-1), groups.amax(-1), atol=1e-6)
    # Gaussian weights: ~ range / 15 / sqrt(12) / std, ~10% at g=128 and less for smaller groups
    rel = error_stats(w, back)["rel_error"]
    assert rel < {32: 0.09, 64: 0.10, 128: 0.12}[group], rel


def test_int4_group_size_rules():
    assert int4_group_size(64, 128) == 64  # a matrix narrower than a group is one group
    assert int4_group_size(512, 128) == 128
    with pytest.raises(ValueError, match="group_size=100"):
        int4_group_size(512, 100)
    with pytest.raises(ValueError, match="layers.0.foo: 96 inputs"):
        int4_group_size(96, 64, "layers.0.foo")
    with pytest.raises(ValueError, match="192 inputs"):
        int4_quantize(torch.randn(4, 192), 128)


# ----------------------------------------------------------------------------- fp8

@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (129, 1), (1, 257), (64, 384)])
def test_fp8_block_layout(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    fp8 = FORMATS["fp8"]
    parts = fp8.quantize(w)
    q, s = parts[""], parts["_scale_inv"]
    rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
    # DeepSeek-V3's layout: the weight keeps its shape in e4m3, one fp32 scale per 128x128 block
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert s.dtype == torch.float32 and s.shape == (rows, cols)
    assert fp8.stored_shapes(shape) == {"": shape, "_scale_inv": (rows, cols)}
    for i in range(rows):
        for j in range(cols):  # each block (partial ones at the edges see only their real elements)
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            assert torch.isclose(s[i, j], w[blk].abs().max() / E4M3_MAX)
            assert float(q[blk].float().abs().max()) == E4M3_MAX
    back = fp8.dequantize(parts)
    # stated bound: 3 mantissa bits -> relative 2^-4 per element, plus the subnormal step 2^-9 * scale
    s_full = s.repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + s_full * 2 ** -9).all()
    assert error_stats(w, back)["rel_error"] < 0.04


# ----------------------------------------------------------------------------- the registry

BOUNDS = {"int8": 0.01, "int4": 0.12, "fp8": 0.04}  # relative error each format states above


def test_every_registered_format_states_a_bound():
    assert set(BOUNDS) == set(FORMATS)  # a new format must come with its round-trip bound


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_registered_format_round_trips_within_its_bound(name):
    fmt = FORMATS[name]
    assert fmt.name == name and weight_format(name) is fmt
    w = weight(48, 256)
    parts = fmt.quantize(w, group_size=64)
    assert set(parts) == {""} | set(fmt.companions)
    assert parts[""].dtype == fmt.stored_dtype
    assert {k: tuple(v.shape) for k, v in parts.items()} == fmt.stored_shapes((48, 256), 64)
    assert all(v.dtype == torch.float32 for k, v in parts.items() if k)
    assert len(fmt.ordered(parts)) == 1 + len(fmt.companions) and fmt.ordered(parts)[0] is parts[""]
    stats = error_stats(w, fmt.dequantize(parts))
    assert 0 < stats["rel_error"] < BOUNDS[name]
    assert fmt.dequantize(parts, torch.bfloat16).dtype == torch.bfloat16
    assert fmt.config(64)["quant_method"] == name


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        weight_format("int3")
    with pytest.raises(ValueError, match="unknown weight format"):
        weight_format("nf4")
