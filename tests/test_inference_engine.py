"""Engine: latent cache, absorbed decode, batching, stops, MTP speculative decoding, bad requests."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tokens

from nanoseek.config import ModelConfig
from nanoseek.inference.engine import Engine
from nanoseek.model import MoE, Transformer
from nanoseek.inference.sampling import sampling_probs

PROMPTS = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18]]


def tiny(**kw) -> Transformer:
    cfg = ModelConfig.preset("tiny").replace(**{"eos_token_id": None, **kw})
    return randomize_(Transformer(cfg), scale=0.1)


def mtp_friendly(model: Transformer, attn_scale: float = 0.02, noise: float = 0.0, seed: int = 0) -> Transformer:
    """Make the (untrained) MTP module a decent drafter, so speculative tests see both outcomes.

    The main blocks' outputs are scaled down, so the model is mostly a bigram f(t_i) plus a
    context-dependent part; the MTP module's eh_proj passes through the embedding of t_{i+1}, so it
    predicts ~f(t_{i+1}), the main model's next guess. Drafts are then accepted about half the time.
    """
    g = torch.Generator().manual_seed(seed)
    D = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(attn_scale)
            mlp = layer.mlp
            downs = [mlp.experts.down_proj, mlp.shared_experts.down_proj.weight] if isinstance(mlp, MoE) \
                else [mlp.down_proj.weight]
            for w in downs:
                w.mul_(attn_scale)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        w = torch.zeros(D, 2 * D)
        w[:, :D] = torch.eye(D)
        model.mtp_layers[0].eh_proj.weight.copy_(w + noise * torch.randn(w.shape, generator=g))
    return model


@torch.no_grad()
def uncached_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ----------------------------------------------------------------------------- cache and attention

def test_greedy_tokens_equal_those_recorded_before_the_inference_core():
    """tests/fixtures/greedy_tokens.json holds Engine.generate's greedy tokens (plain and MTP, on a
    random and an MTP-friendly model) from the code before the shared inference core."""
    want = json.loads((Path(__file__).parent / "fixtures" / "greedy_tokens.json").read_text())
    prompts, n = want["prompts"], want["max_new_tokens"]
    torch.manual_seed(0)
    model = tiny()
    assert tokens(Engine(model).generate(prompts, n)) == want["plain"]
    assert tokens(Engine(model).generate(prompts, n, speculative="mtp")) == want["plain_mtp"]
    friendly = Engine(mtp_friendly(tiny()))
    assert tokens(friendly.generate(prompts, n)) == want["friendly"]
    assert tokens(friendly.generate(prompts, n, speculative="mtp")) == want["friendly_mtp"]
    assert 0 < friendly.stats["acceptance_rate"] < 1  # both outcomes of verification were exercised


def test_prefix_reuse_restores_cached_blocks_and_keeps_the_output():
    model = tiny()
    prompt = list(range(20, 60))
    engine = Engine(model, prefix_cache_bytes=1 << 20)
    first = engine.generate([prompt], 8)[0]
    again = engine.generate([prompt, prompt[:36] + [1, 2, 3]], 8)
    plain = Engine(model).generate([prompt, prompt[:36] + [1, 2, 3]], 8)
    assert first.cached_tokens == 0 and [c.cached_tokens for c in again] == [32, 32]
    assert tokens(again) == tokens(plain) and again[0].tokens == first.tokens
    spec = engine.generate([prompt], 8, speculative="mtp")[0]  # MTP over restored latents: same output
    assert spec.cached_tokens == 32 and spec.tokens == first.tokens
    engine.prefix.clear()
    assert engine.generate([prompt], 8)[0].cached_tokens == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_is_the_latent_formula(dtype):
    model = tiny().to(dtype)
    cfg = model.config
    engine = Engine(model)
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * dtype.itemsize
    assert engine.cache_bytes_per_token() == expected
    cache = engine.new_cache(batch_size=2, max_len=10)
    assert cache.kv.dtype == dtype
    assert cache.kv.numel() * cache.kv.element_size() == expected * 2 * 10  # nothing else is stored
    assert engine.new_cache(1, 10, mtp_layers=1).kv.shape[0] == cfg.num_hidden_layers + 1


def test_cached_greedy_equals_uncached_argmax():
    model = tiny()
    engine = Engine(model)
    outs = engine.generate(PROMPTS, 10)
    for prompt, out in zip(PROMPTS, outs):
        assert out.tokens == uncached_greedy(model, prompt, 10)
    assert engine.stats["tokens_per_forward"] == 1.0
    assert [out.finish_reason for out in outs] == ["length"] * 3


def test_absorbed_and_expanded_attention_agree():
    model = tiny()
    engine = Engine(model)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3, 8, 4]])
    positions = torch.arange(8)[None]
    with torch.no_grad():
        # prefill of a whole prompt: absorbed and expanded, each with a fresh cache
        h_exp = engine.forward(ids, positions, engine.new_cache(1, 16), absorb=False)
        h_abs = engine.forward(ids, positions, engine.new_cache(1, 16), absorb=True)
        assert torch.allclose(engine.logits(h_abs), engine.logits(h_exp), atol=1e-4)
        # one decode step on top of a prefilled cache
        cache = engine.new_cache(1, 16)
        engine.forward(ids, positions, cache, absorb=False)
        copy = engine.new_cache(1, 16)
        copy.kv.copy_(cache.kv)
        step, pos = torch.tensor([[6]]), torch.tensor([[8]])
        a = engine.logits(engine.forward(step, pos, cache, absorb=True))
        b = engine.logits(engine.forward(step, pos, copy, absorb=False))
        full = model(torch.cat((ids, step), dim=1))[:, -1:]
    assert (a - b).abs().max() < 1e-4
    assert (a - full).abs().max() < 1e-4


def test_batch_of_different_lengths_equals_each_alone():
    engine = Engine(tiny())
    batch = tokens(engine.generate(PROMPTS, 8))
    assert batch == [engine.generate([p], 8)[0].tokens for p in PROMPTS]


def test_a_ragged_forward_equals_its_parts_run_alone():
    """Two decode rows and a prefill chunk after a cached prefix in one forward: each part's hidden
    states are those of its own forward (the weights are read once, attention runs per part)."""
    engine = Engine(tiny())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    chunk = torch.tensor([[20, 21, 22, 23, 24]])

    def prefilled():
        cache = engine.new_cache(3, 32)
        with torch.inference_mode():
            engine.forward(ids[:, :5], torch.arange(5).expand(2, 5), cache.view(0, 2), absorb=False)
            engine.forward(chunk[:, :2], torch.arange(2)[None], cache.view(2, 3), absorb=False)
        return cache
    dec_pos, chunk_pos = torch.tensor([[5], [5]]), torch.arange(2, 5)[None]
    cache = prefilled()
    with torch.inference_mode():
        dec, pre = engine.forward_ragged([(ids[:, 5:], dec_pos, cache.view(0, 2), True),
                                          (chunk[:, 2:], chunk_pos, cache.view(2, 3), False)])
    cache = prefilled()
    with torch.inference_mode():
        alone_dec = engine.forward(ids[:, 5:], dec_pos, cache.view(0, 2), absorb=True)
        alone_pre = engine.forward(chunk[:, 2:], chunk_pos, cache.view(2, 3), absorb=False)
    torch.testing.assert_close(dec, alone_dec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre, alone_pre, atol=1e-5, rtol=1e-5)


def test_whole_cache_decode_step_equals_the_sliced_one():
    """The static-shape step compile=True traces (all max_len slots, masked) gives the same tokens;
    run eagerly here, as compiling takes a minute."""
    model = tiny()
    static = Engine(model)
    static._compiled_decode = static._decode_whole
    assert tokens(static.generate(PROMPTS, 8)) == tokens(Engine(model).generate(PROMPTS, 8))
    sampled = dict(temperature=1.0, top_k=20, seed=1)
    assert tokens(static.generate(PROMPTS, 8, **sampled)) == tokens(Engine(model).generate(PROMPTS, 8, **sampled))


def test_decoding_reads_only_the_routed_experts():
    """One-token decode takes the per-expert path: experts nobody chose are never indexed."""
    model = tiny()
    moe = model.moe_layers()[0]
    x = torch.randn(2, model.config.hidden_size)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        few = moe.experts(x, weights, indices)  # no grad: decode path
    with torch.enable_grad():
        sorted_path = moe.experts(x, weights, indices)
    torch.testing.assert_close(few, sorted_path.detach())
    with torch.no_grad():
        chosen = set(indices.flatten().tolist())
        for e in set(range(model.config.n_routed_experts)) - chosen:
            moe.experts.gate_proj[e].fill_(float("nan"))  # would poison the output if read
        assert torch.isfinite(moe.experts(x, weights, indices)).all()


def test_stream_yields_what_generate_returns():
    engine = Engine(tiny())
    chunks = list(engine.stream(PROMPTS, 6))
    assert len(chunks) == 6  # one yield per forward
    joined = [sum((c[i] for c in chunks), []) for i in range(len(PROMPTS))]
    assert joined == tokens(engine.generate(PROMPTS, 6))


# ----------------------------------------------------------------------------- sampling and stops

def test_seed_reproduces_sampling():
    engine = Engine(tiny())
    a = tokens(engine.generate(PROMPTS, 8, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    b = tokens(engine.generate(PROMPTS, 8, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    c = tokens(engine.generate(PROMPTS, 8, temperature=1.0, top_k=20, top_p=0.9, seed=4))
    assert a == b and a != c


def test_row_seeds_make_each_rows_samples_independent_of_the_batch():
    engine = Engine(tiny())
    kw = dict(temperature=1.0, top_k=20)
    together = tokens(engine.generate(PROMPTS, 8, seeds=[11, 12, 13], **kw))
    alone = [engine.generate([p], 8, seeds=[s], **kw)[0].tokens for p, s in zip(PROMPTS, (11, 12, 13))]
    assert together == alone
    assert tokens(engine.generate(PROMPTS[::-1], 8, seeds=[13, 12, 11], **kw)) == together[::-1]
    with pytest.raises(ValueError, match="seeds has 2 entries"):
        engine.generate(PROMPTS, 8, seeds=[1, 2], **kw)


def test_the_servers_sampling_controls_work_in_generate():
    model = tiny()
    engine = Engine(model)
    plain = engine.generate([PROMPTS[0]], 12)[0].tokens
    forced = engine.generate([PROMPTS[0]], 6, logit_bias={7: 100.0})[0].tokens
    assert forced == [7] * 6  # a +100 bias outweighs every logit
    penalised = engine.generate([PROMPTS[0]], 12, repetition_penalty=3.0, presence_penalty=2.0)[0].tokens
    assert penalised != plain and len(set(penalised)) >= len(set(plain))
    eos = plain[2]
    model.config = model.config.replace(eos_token_id=eos)
    assert Engine(model).generate([PROMPTS[0]], 12)[0].finish_reason == "stop"
    held = Engine(model).generate([PROMPTS[0]], 12, min_tokens=8, ignore_eos=False)[0]
    assert len(held.tokens) >= 8 and eos not in held.tokens[:8]
    with pytest.raises(ValueError, match="frobnicate: not a generation setting"):
        engine.generate([PROMPTS[0]], 4, frobnicate=1)


def test_eos_and_stop_sequences_end_generation():
    model = tiny()
    full = Engine(model).generate([PROMPTS[0]], 10)[0].tokens
    # EOS: the model's eos id ends the row and is not returned
    eos = full[4]
    model.config = model.config.replace(eos_token_id=[999, eos])
    engine = Engine(model)
    out = engine.generate([PROMPTS[0]], 10)[0]
    assert out.tokens == full[:full.index(eos)] and out.finish_reason == "stop"
    model.config = model.config.replace(eos_token_id=None)
    # a stop sequence ends it too, excluded, and a stream never shows its first tokens
    engine = Engine(model)
    stop = full[5:7]
    cut = next(i for i in range(len(full) - 1) if full[i:i + 2] == stop)
    chunks = list(engine.stream([PROMPTS[0]], 10, stop=[[1000, 1001, 1002], stop]))
    assert sum((c[0] for c in chunks), []) == full[:cut]
    assert engine.generate([PROMPTS[0]], 10, stop=[[1000, 1001, 1002], stop])[0].finish_reason == "stop"
    assert tokens(engine.generate([PROMPTS[0]], 10, stop=[[1000, 1001]])) == [full]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[1, 5000]]), "outside"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=1024), "exceed the context of 1024"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(stop=[[]]), "stop"),
    (dict(speculative="eagle"), "speculative"),
])
def test_bad_requests_raise(kwargs, message):
    engine = Engine(tiny())
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        engine.generate(**args)


def test_speculative_needs_an_mtp_module():
    with pytest.raises(ValueError, match="MTP"):
        Engine(tiny(num_nextn_predict_layers=0)).generate([[1, 2]], 4, speculative="mtp")


# ----------------------------------------------------------------------------- speculative decoding

def test_mtp_speculative_greedy_equals_plain_greedy():
    engine = Engine(mtp_friendly(tiny()))
    plain = tokens(engine.generate(PROMPTS, 24))
    spec = tokens(engine.generate(PROMPTS, 24, speculative="mtp"))
    assert spec == plain
    stats = engine.stats
    assert 0.2 < stats["acceptance_rate"] < 0.95  # both the accept and the rollback path ran
    assert stats["tokens_per_forward"] == pytest.approx(
        1 + stats["accepted"] / stats["row_forwards"], abs=0.15)
    # rows alone (their own acceptance pattern) give the same tokens as in the batch
    assert [engine.generate([p], 24, speculative="mtp")[0].tokens for p in PROMPTS] == plain
    # an untrained MTP module is rarely right, and the output still does not change
    raw = Engine(tiny())
    assert tokens(raw.generate(PROMPTS, 12, speculative="mtp")) == tokens(raw.generate(PROMPTS, 12))


def test_mtp_speculative_respects_stops_and_length():
    engine = Engine(mtp_friendly(tiny()))
    full = engine.generate([PROMPTS[0]], 16)[0].tokens
    for n in (1, 2, 7):
        assert engine.generate([PROMPTS[0]], n, speculative="mtp")[0].tokens == full[:n]
    stop = full[6:8]
    cut = next(i for i in range(len(full) - 1) if full[i:i + 2] == stop)
    assert engine.generate([PROMPTS[0]], 16, stop=[stop], speculative="mtp")[0].tokens == full[:cut]


@torch.no_grad()
def exact_joint(model, prompt, n_new, temperature, top_k, top_p, draft_for_second=False):
    """P(t1..t_n) of the plain sampler by enumeration over a tiny vocabulary: [V] * n_new tensor.

    draft_for_second=True gives instead the law of a broken sampler that keeps every MTP draft
    (t2 from the MTP distribution): the test must be able to tell it apart.
    """
    V = model.config.vocab_size
    prefixes = torch.cartesian_prod(*[torch.arange(V)] * (n_new - 1)).view(-1, n_new - 1)
    ids = torch.cat((torch.tensor(prompt).expand(len(prefixes), -1), prefixes), dim=1)
    hidden, mtp_logits = model.forward_train(ids)
    P = len(prompt)
    probs = sampling_probs(model.lm_head(hidden[:, P - 1:]), temperature, top_k, top_p)  # [N, n_new, V]
    if draft_for_second:
        probs[:, 1] = sampling_probs(mtp_logits[0][:, P - 1], temperature, top_k, top_p)
    joint = probs[:, 0].gather(1, prefixes[:, :1]).squeeze(1)
    for k in range(1, n_new - 1):
        joint = joint * probs[:, k].gather(1, prefixes[:, k:k + 1]).squeeze(1)
    joint = joint[:, None] * probs[:, -1]  # [N, V]
    return joint.view(*[V] * n_new)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 6, 0.9)])
def test_speculative_sampling_keeps_the_models_distribution(temperature, top_k, top_p):
    """Empirical law of 3 sampled tokens vs the exact one, over V^3 = 512 outcomes.

    Tolerance: 4x the expected total-variation distance of N multinomial draws from the exact
    law, sum_i sqrt(p_i (1 - p_i) / (2 pi N)). A sampler that kept every draft is far outside it.
    """
    model = mtp_friendly(tiny(vocab_size=8), attn_scale=0.1, noise=0.02)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # ~10-20 likely outcomes: a law with shape, not a near-uniform one
    engine = Engine(model)
    prompt, N = [3, 1, 4, 1], 6000
    exact = exact_joint(model, prompt, 3, temperature, top_k, top_p).flatten()
    expected_tv = (exact * (1 - exact) / (2 * math.pi * N)).sqrt().sum().item()
    tol = 4 * expected_tv
    broken = exact_joint(model, prompt, 3, temperature, top_k, top_p, draft_for_second=True).flatten()
    assert 0.5 * (broken - exact).abs().sum() > 2 * tol

    for speculative in (None, "mtp"):
        outs = tokens(engine.generate([prompt] * N, 3, temperature, top_k, top_p, seed=0, speculative=speculative))
        codes = torch.tensor([(a * 8 + b) * 8 + c for a, b, c in outs])
        empirical = torch.bincount(codes, minlength=512).double() / N
        tv = 0.5 * (empirical - exact.double()).abs().sum().item()
        assert tv < tol, (speculative, tv, tol)
    assert 0.1 < engine.stats["acceptance_rate"] < 0.95
