"""nanoseek's int8 / int4 CPU kernels (quant/cpu_kernels.py, csrc/gemv.cpp) against the exact fp32
product with the dequantized weight, the fallback to torch's kernels (NANOSEEK_NO_EXT=1, or a native
int4 module whose extension went away), and a tiny quantized model with and without them.

The kernels quantize each row of x in blocks (int16 in blocks of 64 inputs for int8 weights, int8
in blocks of 32 for int4), x_hat = round(x / sx) * sx with sx = max|x in block| / qmax (32767 or
127), so |x - x_hat| <= sx / 2 per input and
each output is off by at most sum_k sx_k / 2 * |w_k - c_k| (c = 0 for int8; c = the group's centre,
zero = wmin + 8 * scale, for int4, whose codes meet the activation as c - 8), plus fp32 rounding.
That bound is what these tests check, element by element. Tests that need the extension skip
where the machine cannot build it (CPU, compiler) and fail where it can but the build fails.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import tokens

from nanoseek import ModelConfig, Transformer
from nanoseek.inference import Engine
from nanoseek.quant import cpu_kernels, quantize_model
from nanoseek.quant.formats import int4_quantize, int8_quantize
from nanoseek.quant.modules import (Int4Experts, Int4Linear, Int8Experts, Int8Linear, int4_centred,
                                    int4_kernel_layout, int4_weight)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ext(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV_DISABLE, raising=False)
    can_build = cpu_kernels.enabled()  # the CPU, a compiler and ninja, and no failed build yet: builds nothing
    if cpu_kernels.kernels() is None:
        if can_build:  # a broken source must fail here, not skip every kernel test
            pytest.fail("this machine can build nanoseek's CPU kernels, but the build failed (its log is above)")
        pytest.skip("nanoseek's CPU kernels cannot be built or run here")


def act_error_bound(x: torch.Tensor, centred_w: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """[M, N]: sum_k sx_k / 2 * |w_k - c_k|, sx_k the activation scale of k's block (see the docstring)."""
    M, K = x.shape
    sx = x.view(M, K // block, block).abs().amax(-1) / qmax
    half_step = sx.repeat_interleave(block, dim=1) / 2  # [M, K]
    return half_step @ centred_w.abs().T


def data(M, N, K, outlier=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if outlier:  # one input 50x the rest, as LLM activations have
        x[:, K // 3] *= 50
    return x, torch.randn(N, K, generator=g) * 0.05


SHAPES = [(1, 80, 256), (3, 33, 128), (8, 7, 64), (13, 129, 1408), (2, 2048, 192)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("outlier", [False, True])
def test_int8_kernel_within_activation_rounding_of_exact_product(ext, M, N, K, outlier):
    x, w = data(M, N, K, outlier)
    q, scale = int8_quantize(w)
    scale = scale.bfloat16()
    w_hat = q.float() * scale.float()[:, None]
    y = cpu_kernels.int8_mm(x, q, scale)
    ref = x @ w_hat.T
    bound = act_error_bound(x, w_hat, 64, 32767)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert ((y - ref).abs() <= bound + 1e-5 * (x.abs() @ w_hat.abs().T) + 1e-6).all()
    assert float((y - ref).norm() / ref.norm()) < 1e-4  # int16 activations: below bf16's rounding


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("outlier", [False, True])
def test_int4_kernel_within_activation_rounding_of_exact_product(ext, M, N, K, group, outlier):
    if K % group:
        pytest.skip("K is not a multiple of the group")
    x, w = data(M, N, K, outlier, seed=1)
    packed, scale, wmin = int4_quantize(w, group)
    scale, zero = int4_centred(scale, wmin)
    w_hat = int4_weight(packed, scale, zero)  # (codes - 8) * scale + zero, bf16 companions
    y = cpu_kernels.int4_mm(x, packed, scale, zero)
    ref = x @ w_hat.T
    centre = zero.float().repeat_interleave(group, dim=1)
    bound = act_error_bound(x, w_hat - centre, 32, 127)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert ((y - ref).abs() <= bound + 1e-5 * (x.abs() @ w_hat.abs().T) + 1e-6).all()
    if not outlier:
        assert float((y - ref).norm() / ref.norm()) < 0.01


def test_int4_group_of_256(ext):
    x, w = data(3, 40, 512)
    packed, scale, wmin = int4_quantize(w, 256)
    scale, zero = int4_centred(scale, wmin)
    ref = x @ int4_weight(packed, scale, zero).T
    assert float((cpu_kernels.int4_mm(x, packed, scale, zero) - ref).norm() / ref.norm()) < 0.01


def test_kernels_take_threads_and_give_the_same_result(ext):
    x, w = data(4, 1000, 1024)
    q, scale = int8_quantize(w)
    packed, s4, wmin = int4_quantize(w, 64)
    s4, zero = int4_centred(s4, wmin)
    one = cpu_kernels.int8_mm(x, q, scale.bfloat16()), cpu_kernels.int4_mm(x, packed, s4, zero)
    torch.set_num_threads(2)  # the one_thread fixture puts it back
    two = cpu_kernels.int8_mm(x, q, scale.bfloat16()), cpu_kernels.int4_mm(x, packed, s4, zero)
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # rows are split, sums are not


# ----------------------------------------------------------------------------- modules and fallback

def test_modules_use_the_extension_by_default(ext):
    x, w = data(3, 48, 128)
    lin8 = Int8Linear(128, 48)
    q, scale = int8_quantize(w)
    lin8.set_quantized(q, scale)
    assert torch.equal(lin8(x), cpu_kernels.int8_mm(x, q, scale.bfloat16()))
    lin4 = Int4Linear(128, 48, group_size=32)
    parts = int4_quantize(w, 32)
    lin4.set_quantized(*parts)
    assert lin4.layout == "native" and torch.equal(lin4.qweight, parts[0])  # the on-disk codes, as they are
    assert torch.equal(lin4(x), cpu_kernels.int4_mm(x, parts[0], *int4_centred(*parts[1:])))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_one_token_runs_its_experts_in_two_batched_products(ext, method):
    """Decoding one token: all its chosen experts in one gate_up and one down product (reading only
    those experts' weights); the same numbers as the per-expert loop that a batch of tokens takes."""
    E, D, I = 8, 128, 64
    experts = (Int8Experts(E, D, I) if method == "int8" else Int4Experts(E, D, I, group_size=32))
    quant = int8_quantize if method == "int8" else (lambda w: int4_quantize(w, 32))
    g = torch.Generator().manual_seed(0)
    for e in range(E):
        experts.set_expert(e, *(quant(torch.randn(n, k, generator=g) * 0.05) for n, k in ((I, D), (I, D), (D, I))))
    x = torch.randn(2, D, generator=g)
    weights, indices = torch.rand(2, 3, generator=g), torch.tensor([[5, 0, 2], [1, 5, 7]])
    with torch.no_grad():
        batch = experts(x, weights, indices)  # two tokens: the per-expert loop
        one = experts(x[:1], weights[:1], indices[:1])
        ids = indices[0]
        gate_up = (cpu_kernels.int8_mm_experts(x[:1], experts.gate_up_proj, experts.gate_up_scale, ids)
                   if method == "int8" else
                   cpu_kernels.int4_mm_experts(x[:1], experts.gate_up_proj, experts.gate_up_scale,
                                               experts.gate_up_zero, ids))
    assert gate_up.shape == (3, 2 * I)
    for i, e in enumerate(ids.tolist()):  # row i is expert ids[i]'s product
        single = (cpu_kernels.int8_mm(x[:1], experts.gate_up_proj[e], experts.gate_up_scale[e]) if method == "int8"
                  else cpu_kernels.int4_mm(x[:1], experts.gate_up_proj[e], experts.gate_up_scale[e],
                                           experts.gate_up_zero[e]))
        assert torch.equal(gate_up[i], single[0])
    assert torch.allclose(one[0], batch[0], rtol=1e-4, atol=1e-6)


def test_an_input_that_wants_a_gradient_is_left_to_torch(ext):
    """The kernels have no backward: such a product goes to torch's kernel, whose missing derivative
    is an error, instead of silently cutting the graph."""
    x, w = data(2, 16, 64)
    q, scale = int8_quantize(w)
    assert cpu_kernels.int8_mm(x.requires_grad_(), q, scale.bfloat16()) is None
    with torch.no_grad():
        assert cpu_kernels.int8_mm(x, q, scale.bfloat16()) is not None


def test_disabled_extension_falls_back_to_torch_kernels(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_DISABLE, "1")
    assert not cpu_kernels.enabled() and cpu_kernels.kernels() is None
    x, w = data(2, 48, 128)
    q, scale = int8_quantize(w)
    assert cpu_kernels.int8_mm(x, q, scale.bfloat16()) is None
    lin8 = Int8Linear(128, 48)
    lin8.set_quantized(q, scale)
    assert torch.equal(lin8(x), torch._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16()).float())
    parts = int4_quantize(w, 64)
    lin4 = Int4Linear(128, 48, group_size=64)
    lin4.set_quantized(*parts)
    assert lin4.layout == "torch"
    kq, ksz = int4_kernel_layout(*parts)
    assert torch.equal(lin4(x), torch._weight_int4pack_mm_for_cpu(x.bfloat16(), kq, 64, ksz)[:, :48].float())


def test_native_int4_modules_convert_to_torch_layout_when_the_extension_goes(ext, monkeypatch):
    x, w = data(2, 48, 128)
    parts = int4_quantize(w, 64)
    lin = Int4Linear(128, 48, group_size=64)
    lin.set_quantized(*parts)
    E, D, I = 4, 128, 64
    experts = Int4Experts(E, D, I, group_size=64)
    ws = [int4_quantize(torch.randn(n, k) * 0.05, 64) for n, k in ((I, D), (I, D), (D, I))]
    for e in range(E):
        experts.set_expert(e, *ws)
    assert lin.layout == experts.layout == "native"
    before = lin.dequantize(), experts.expert_weights(1)
    monkeypatch.setenv(cpu_kernels.ENV_DISABLE, "1")
    y = lin(x)  # converts itself once, then runs torch's kernel
    assert lin.layout == "torch" and lin.qweight.shape[0] % 16 == 0
    assert torch.allclose(y, torch._weight_int4pack_mm_for_cpu(x.bfloat16(), lin.qweight, 64,
                                                               lin.scales_and_zeros)[:, :48].float())
    assert float((lin.dequantize() - before[0]).norm() / before[0].norm()) < 0.01  # bf16 zero re-rounded
    routed = experts(torch.randn(3, D), torch.rand(3, 2), torch.tensor([[0, 1], [1, 2], [3, 0]]))
    assert experts.layout == "torch" and routed.shape == (3, D)
    for got, want in zip(experts.expert_weights(1), before[1]):
        assert float((got - want).norm() / want.norm()) < 0.01


def test_a_failed_build_falls_back_to_torch_kernels_and_says_so_once(ext, tmp_path):
    """In a fresh process whose build directory cannot be made: a native int4 module converts itself
    to torch's layout on its first product, products keep working, one warning in the log."""
    code = ("import logging, os, torch; logging.basicConfig(level=logging.WARNING)\n"
            "from nanoseek.quant import cpu_kernels\n"
            "from nanoseek.quant.formats import int4_quantize, int8_quantize\n"
            "from nanoseek.quant.modules import Int4Linear, Int8Linear\n"
            "w = torch.randn(16, 128)\n"
            "lin4, lin8 = Int4Linear(128, 16, group_size=64), Int8Linear(128, 16)\n"
            "first = lin4.layout\n"
            "lin4.set_quantized(*int4_quantize(w, 64)); lin8.set_quantized(*int8_quantize(w))\n"
            "x = torch.randn(2, 128)\n"
            "ref = x @ w.T\n"
            "ok = all(float((m(x) - ref).norm() / ref.norm()) < 0.2 for _ in range(3) for m in (lin4, lin8))\n"
            "print(first, lin4.layout, ok, cpu_kernels.kernels() is None, cpu_kernels.enabled())\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "NANOSEEK_EXT_DIR": str(blocker / "sub")}  # mkdir under a file fails
    env.pop(cpu_kernels.ENV_DISABLE, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["native", "torch", "True", "True", "False"]
    assert out.stderr.count("nanoseek CPU kernels not used") == 1 and "build failed" in out.stderr


def test_importing_nanoseek_builds_nothing():
    code = ("import sys, nanoseek, nanoseek.quant, nanoseek.quant.modules; "
            "print('torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- a tiny model

def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny")).eval()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tiny_model_same_greedy_tokens_with_and_without_extension_up_to_near_ties(ext, method, monkeypatch):
    """Greedy decoding through the engine with the extension; the same sequences scored by the model
    without it (torch's kernels): at every generated position both pick the same token, or the
    two candidates' logits are closer than the two models' logits differ there (a near-tie that
    the activations' rounding decides; a random tiny model has many)."""
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    native = quantize_model(tiny(), method, group_size=32)
    outs = tokens(Engine(native).generate(prompts, 8))
    monkeypatch.setenv(cpu_kernels.ENV_DISABLE, "1")
    fallback = quantize_model(tiny(), method, group_size=32)
    assert type(fallback.lm_head) is type(native.lm_head)
    ties = 0
    for p, out in zip(prompts, outs):
        seq = torch.tensor([p + out])
        with torch.no_grad():
            monkeypatch.delenv(cpu_kernels.ENV_DISABLE)
            a = native(seq)[0, len(p) - 1:-1]
            monkeypatch.setenv(cpu_kernels.ENV_DISABLE, "1")
            b = fallback(seq)[0, len(p) - 1:-1]
        assert a.argmax(-1).tolist() == out  # the engine's greedy tokens are the model's own picks
        per_position = (a - b).norm(dim=-1) / b.norm(dim=-1)
        # int8 activations vs bf16 ones: ~1-2% per position; where the rounding flips a near-tie in
        # the MoE routing (another expert chosen) a position moves more (~10% here, both ways)
        assert per_position.median() < 0.03 and per_position.max() < 0.25
        for t, (ra, rb) in enumerate(zip(a, b)):
            pick, other = int(ra.argmax()), int(rb.argmax())
            if pick != other:
                ties += 1
                assert rb[other] - rb[pick] <= 2 * (ra - rb).abs().max(), (p, t)
    assert ties <= 4  # of 16 tokens
