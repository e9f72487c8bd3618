"""DeepSeek-V4 (v4.py): logits against transformers' DeepseekV4ForCausalLM with every layer type
(window only, CSA with the lightning indexer, HCA, hash-routed MoE), contexts past the window and
several compression blocks; the checkpoint round trip both ways; the config's two spellings; the
engine's incremental decoding on the compressed cache against the full forward; packed documents;
mHC and hash routing on their own."""

import pytest
import torch
from conftest import randomize_, tokens

from nanoseek.config import ModelConfig
from nanoseek.hf.io import load_pretrained, save_pretrained
from nanoseek.inference import Batch, Engine, SamplingParams, Sequence
from nanoseek.inference.cache import PrefixCache
from nanoseek.inference.compressed import CompressedCache, fixed_bytes
from nanoseek.models import build_model
from nanoseek.v4 import HashGate, HyperConnection, V4Transformer

transformers = pytest.importorskip("transformers")


def random_v4(cfg=None, seed=0):
    cfg = cfg or ModelConfig.preset("tiny-v4")
    model = randomize_(build_model(cfg), seed=seed, scale=0.1).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # mHC, sinks and compression biases visibly away from their initial values
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("fn", "base", "scale", "hc_fn", "hc_base", "hc_scale", "sinks",
                                           "position_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def reference_state(model) -> dict:
    """nanoseek's state dict under transformers' in-memory names (the indexer sits in the compressor
    there, experts' gate and up fused), MTP left out (transformers does not build it)."""
    cfg, sd, out = model.config, model.state_dict(), {}
    for k, v in sd.items():
        if k.startswith(f"model.layers.{cfg.num_hidden_layers}.") or k.endswith("experts.up_proj"):
            continue
        if k.endswith("experts.gate_proj"):
            out[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, sd[k.replace("gate_proj", "up_proj")]], 1)
            continue
        k = k.replace("self_attn.indexer.compressor.", "self_attn.compressor.indexer.")
        k = k.replace("self_attn.indexer.q_b_proj", "self_attn.compressor.indexer.q_b_proj")
        out[k.replace("self_attn.indexer.weights_proj", "self_attn.compressor.indexer.scorer.weights_proj")] = v
    return out


def reference_model(model):
    cfg = model.config.to_hf()
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})).eval()
    missing, unexpected = hf.load_state_dict(reference_state(model), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


@pytest.fixture(scope="module")
def model():
    return random_v4()


def test_tiny_config_has_every_mechanism(model):
    cfg = model.config
    kinds = {cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers)}
    assert kinds == {0, 4, 16} and cfg.num_hash_layers >= 1 and cfg.hc_mult > 1
    assert isinstance(model.model.layers[0].mlp.gate, HashGate)
    assert model.model.layers[1].self_attn.indexer is not None and model.model.layers[2].self_attn.indexer is None


@pytest.mark.parametrize("length", [7, 70, 300])
def test_logits_match_transformers(model, length, one_thread):
    """70 tokens: past the window of 8, 17 CSA entries (the indexer keeps 4) and 4 HCA entries of 16;
    300: queries in two blocks (QUERY_BLOCK), 75 CSA entries."""
    ids = torch.randint(0, model.config.vocab_size, (2, length))
    with torch.no_grad():
        ours, ref = model(ids), reference_model(model)(ids).logits
    assert (ours - ref).abs().max() < 1e-4


def test_checkpoint_round_trip_through_transformers(model, tmp_path, one_thread):
    save_pretrained(model, tmp_path / "ours")
    keys = set(__import__("json").loads((tmp_path / "ours" / "config.json").read_text()))
    assert {"compress_ratios", "num_hash_layers", "qk_rope_head_dim", "sliding_window"} <= keys
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        want = model(ids)
        assert (hf(ids).logits - want).abs().max() < 1e-4
        hf.save_pretrained(tmp_path / "theirs")
        with pytest.warns(UserWarning, match="mtp.0"):
            back = load_pretrained(tmp_path / "theirs")
        assert (back(ids) - want).abs().max() < 1e-4
        again = load_pretrained(tmp_path / "ours")  # our own save keeps the MTP module
    assert again.config.num_nextn_predict_layers == 1
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_published_and_transformers_config_spellings_agree(model):
    cfg = model.config
    published = cfg.to_hf()
    theirs = transformers.DeepseekV4Config(**{k: v for k, v in published.items()
                                              if k not in ("architectures", "model_type")}).to_dict()
    assert "layer_types" in theirs and "mlp_layer_types" in theirs and "main" in theirs["rope_parameters"]
    assert ModelConfig.from_hf(published) == cfg
    assert ModelConfig.from_hf(theirs).replace(extra={}) == cfg.replace(extra={})


def test_bad_compress_ratios_are_refused():
    with pytest.raises(ValueError, match="compress_ratios"):
        ModelConfig.preset("tiny-v4").replace(compress_ratios=[0, 4])


def test_engine_decoding_equals_the_full_forward(model, one_thread):
    """Rows at different positions, each closing CSA and HCA windows while it decodes; the longest
    has enough CSA entries that decoding gathers the indexer's picks instead of masking."""
    engine = Engine(model)
    prompts = [torch.randint(2, 1000, (n,)).tolist() for n in (90, 5, 21)]
    outs = tokens(engine.generate(prompts, 30, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids, want = list(prompt), []
        with torch.no_grad():
            for _ in range(30):
                want.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
                ids.append(want[-1])
        assert out == want


def test_chunked_prefill_gives_the_tokens_of_whole_prefill(model, one_thread):
    engine = Engine(model)
    prompts = [torch.randint(2, 1000, (n,)).tolist() for n in (45, 9)]
    whole = tokens(engine.generate(prompts, 12, ignore_eos=True))
    cache = CompressedCache(model.config, 2, 128, torch.float32)
    batch = Batch(engine, 2, 128, None, PrefixCache(0), cache, max_batched_tokens=6)
    seqs = [Sequence(p, SamplingParams(max_tokens=12, ignore_eos=True)) for p in prompts]
    batch.admit(seqs)
    while batch.rows:
        batch.step()
        batch.leave()
    assert [s.out for s in seqs] == whole


def test_cache_grows_by_the_configured_bytes_per_token():
    cfg = ModelConfig.preset("tiny-v4")
    small, large = (CompressedCache(cfg, 1, n, torch.float32).nbytes for n in (1024, 2048))
    per_token = cfg.cache_bytes_per_token(4)
    assert abs((large - small) / 1024 - per_token) < 1
    assert small - 1024 * per_token == pytest.approx(fixed_bytes(cfg, 4), rel=0.05)
    v3 = ModelConfig.preset("deepseek-v3").cache_bytes_per_token(2)
    assert ModelConfig.preset("deepseek-v4-flash").cache_bytes_per_token(2) < v3 / 5


def test_packed_documents_equal_separate_forwards(model, one_thread):
    a, b = torch.randint(0, 1000, (1, 23)), torch.randint(0, 1000, (1, 30))
    positions = torch.cat((torch.arange(23), torch.arange(30)))[None]
    with torch.no_grad():
        packed = model(torch.cat((a, b), 1), positions=positions)
        assert (packed[:, :23] - model(a)).abs().max() < 1e-5
        assert (packed[:, 23:] - model(b)).abs().max() < 1e-5


def test_training_forward_has_mtp_logits_and_gradients(model):
    ids = torch.randint(0, 1000, (2, 20))
    hidden, mtp = model.forward_train(ids)
    assert hidden.shape == (2, 20, model.config.hidden_size) and len(mtp) == 1
    (model.lm_head(hidden).logsumexp(-1).mean() + mtp[0].logsumexp(-1).mean()).backward()
    layer = model.model.layers[1]
    for p in (layer.attn_hc.fn, layer.self_attn.sinks, layer.self_attn.compressor.kv_proj.weight,
              layer.self_attn.compressor.position_bias, model.model.layers[-1].e_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the top-k choice passes no gradient to the indexer's queries (V3.2 trains them with their own loss)
    assert layer.self_attn.indexer.q_b_proj.weight.grad is None
    model.zero_grad()


@pytest.mark.parametrize("iters", [20, 300])
def test_hyper_connection_mixing_is_doubly_stochastic(iters):
    """Sinkhorn-Knopp ends on a column normalisation (exact); rows converge with the iterations."""
    cfg = ModelConfig.preset("tiny-v4").replace(hc_mult=4, hc_sinkhorn_iters=iters)
    hc = HyperConnection(cfg)
    torch.nn.init.normal_(hc.fn, std=0.2)
    post, comb, h = hc(torch.randn(2, 5, 4, cfg.hidden_size))
    assert torch.allclose(comb.sum(-2), torch.ones(2, 5, 4), atol=1e-3)
    assert torch.allclose(comb.sum(-1), torch.ones(2, 5, 4), atol=0.1 if iters == 20 else 1e-3)
    assert (comb >= 0).all() and (post > 0).all() and (post < 2).all() and h.shape == (2, 5, cfg.hidden_size)


def test_hash_layers_route_by_token_whatever_the_scores():
    cfg = ModelConfig.preset("tiny-v4")
    gate = HashGate(cfg)
    gate.tid2eid.copy_(torch.arange(cfg.vocab_size)[:, None] % 8 + torch.tensor([0, 1]) * 0)
    gate.tid2eid[:, 1] = (gate.tid2eid[:, 0] + 3) % 8
    torch.nn.init.normal_(gate.weight)
    ids = torch.tensor([5, 13, 5])
    weights, indices, _ = gate(torch.randn(3, cfg.hidden_size), ids)
    assert indices.tolist() == [[5, 0], [5, 0], [5, 0]]
    assert torch.allclose(weights.sum(-1), torch.full((3,), cfg.routed_scaling_factor))


@pytest.mark.parametrize("agree", [False, True])
def test_mtp_speculative_decoding_keeps_the_greedy_tokens(model, agree, one_thread):
    """The MTP module drafts from the main model's residual streams and its own window cache; the
    tokens are greedy decoding's whether drafts are rejected (random module) or all accepted (both
    heads made to always pick token 0: zero output norms)."""
    import copy
    m = copy.deepcopy(model)
    if agree:
        with torch.no_grad():
            m.model.norm.weight.zero_()
            m.mtp_layers[0].norm.weight.zero_()
    engine = Engine(m)
    prompts = [torch.randint(2, 1000, (n,)).tolist() for n in (21, 6)]
    want = tokens(engine.generate(prompts, 24, ignore_eos=True))
    assert tokens(engine.generate(prompts, 24, ignore_eos=True, speculative="mtp")) == want
    assert engine.stats["drafted"] > 0
    assert (engine.stats["acceptance_rate"] == 1.0) if agree else engine.stats["acceptance_rate"] < 1.0


def test_what_the_engine_does_not_offer_is_refused(model):
    with pytest.raises(ValueError, match="prefix caching"):
        CompressedCache(model.config, 1, 64, torch.float32).snapshot(0, 0, 16)
    assert isinstance(build_model(model.config), V4Transformer)
    with pytest.raises(ValueError, match="compiled"):
        Engine(model, compile=True)


def test_the_server_core_pages_the_compressed_cache_and_preempts(model, tmp_path, capsys, one_thread):
    """serve's scheduler on a budget of a few pages: rows wait, are preempted and resume, and every
    request gets the engine's tokens; then `nanoseek generate` and `quantize` run a V4 checkpoint."""
    from nanoseek import cli
    from nanoseek.inference.scheduler import Scheduler
    from nanoseek.tokenizer import Tokenizer
    cfg = model.config
    engine = Engine(model)
    probe = CompressedCache(cfg, 1, 64, torch.float32)
    budget = 4 * fixed_bytes(cfg, 4) + 7 * probe.page_bytes  # 4 slots' windows, 6 pages of 16 tokens + scratch
    with pytest.warns(UserWarning, match="prefix caching is off"):
        sched = Scheduler(engine, max_batch=4, kv_cache_bytes=budget, max_batched_tokens=6,
                          prefix_cache_bytes=1 << 20)
    assert sched.batch.cache.num_pages == 6
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18], [40] * 20]
    events = [[] for _ in prompts]
    reqs = [sched.submit(p, SamplingParams(max_tokens=20 + i, ignore_eos=True), ev.append)
            for i, (p, ev) in enumerate(zip(prompts, events))]
    for _ in range(10_000):
        if not sched.step() and sched.waiting == 0:
            break
    for ev, req, p in zip(events, reqs, prompts):
        assert [t for e in ev for t in e.token_ids] == engine.generate([p], req.params.max_tokens,
                                                                       ignore_eos=True)[0].tokens
    assert sched.stats["preempted"] > 0
    tok = Tokenizer.train(["12+30=42", "the answer is 42", "think first"] * 20, vocab_size=300)
    save_pretrained(model, tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    assert cli.main(["quantize", "--model", str(tmp_path / "bf16"), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    for path in ("bf16", "q"):
        assert cli.main(["generate", "--model", str(tmp_path / path), "--prompt", "12+30=", "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out.strip()
    quantized = load_pretrained(tmp_path / "q")
    experts, ours = quantized.model.layers[1].mlp.experts, model.model.layers[1].mlp.experts
    assert type(experts).__name__ == "Int8Experts" and experts.limit == cfg.swiglu_limit
    gate = experts.expert_weights(0)[0]
    assert (gate - ours.gate_proj[0]).norm() / ours.gate_proj[0].norm() < 0.01
    for name in ("attn_hc.fn", "self_attn.sinks", "self_attn.compressor.position_bias"):  # kept in fp32, exactly
        kept = quantized.model.layers[1].get_parameter(name)
        assert kept.dtype == torch.float32 and torch.equal(kept, model.model.layers[1].get_parameter(name))


def published_fp8_checkpoint(model, path):
    """`model` saved as DeepSeek ships V4: attention and shared-expert weights in FP8 (e4m3, a
    power-of-two ue8m0 scale per 128x128 block under ``<name>.scale``), routed experts in FP4 (e2m1,
    two per byte, a ue8m0 scale per 32 inputs), compressors, router, embeddings and head in high precision."""
    import json

    from safetensors.torch import load_file, save_file

    from nanoseek.quant.formats import FORMATS, FP4
    save_pretrained(model, path / "plain")
    out = {}
    for key, t in load_file(path / "plain" / "model.safetensors").items():
        base = key.removesuffix(".weight")
        if key.endswith(".weight") and ".ffn.experts." in key:
            parts = FP4.quantize(t)
        elif key.endswith(".weight") and "compressor" not in key and any(
                f".{n}." in key for n in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "shared_experts")):
            parts = FORMATS["fp8"].quantize(t)
            parts["_scale_inv"] = parts["_scale_inv"].log2().ceil().exp2().to(torch.float8_e8m0fnu)
        else:
            out[key] = t
            continue
        out[key], out[base + ".scale"] = parts[""], parts["_scale_inv"]
    (path / "fp8").mkdir()
    save_file(out, path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
                                     "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (path / "fp8" / "config.json").write_text(json.dumps(config))
    return path / "fp8"


def test_the_published_fp8_checkpoint_loads_as_transformers_reads_it(model, tmp_path, one_thread):
    """FP8 attention, FP4 routed experts, ue8m0 scales under ``.scale``: nanoseek's dequantized load
    equals transformers' (FineGrainedFP8Config(dequantize=True)); `nanoseek quantize --to bf16` too."""
    from nanoseek.quant.convert import convert_checkpoint
    fp8 = published_fp8_checkpoint(model, tmp_path)
    ours = load_pretrained(fp8, dtype=torch.float32)
    assert ours.model.layers[1].mlp.experts.gate_proj.dtype == torch.float32
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(
        fp8, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        want = hf(ids).logits
        assert (ours(ids) - want).abs().max() < 1e-4
        assert (ours(ids) - model(ids)).abs().max() > 1e-3  # it did read the quantized weights
        convert_checkpoint(fp8, tmp_path / "bf16", "bf16", progress=False)
        bf16 = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
        assert (bf16(ids) - want).abs().max() < 0.1 * want.abs().max()


def test_the_training_loop_overfits_packed_documents(tmp_path, one_thread):
    """train() (one optimizer step for every loop) on packed rows: next-token + MTP loss, balancing
    bias updates, the checkpoint it writes loads back as V4."""
    import json

    from nanoseek.data import pack_documents
    from nanoseek.train.loop import TrainConfig, train
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 1000, (int(n),), generator=g).tolist() for n in torch.randint(6, 20, (6,), generator=g)]
    rows = pack_documents(docs, seq_len=32, eos_id=1, pad_id=0)
    cfg = TrainConfig(progress=False, warmup_steps=2, steps=40, batch_size=len(rows), micro_batch_size=len(rows),
                      lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    train(build_model(ModelConfig.preset("tiny-v4")), rows, cfg, tmp_path)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert losses[0] > 5.0 and losses[-1] < 0.5 * losses[0]
    assert isinstance(load_pretrained(tmp_path), V4Transformer)


def test_lora_adapts_v4_attention_and_shared_experts():
    from nanoseek.rl.lora import add_lora, merge_and_unload
    m = add_lora(build_model(ModelConfig.preset("tiny-v4")), rank=4, alpha=8)
    adapted = {n.split(".lora_")[0].split(".", 3)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert adapted == {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj", "self_attn.o_b_proj",
                       "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"}
    assert isinstance(merge_and_unload(m), V4Transformer)
