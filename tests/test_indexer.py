"""DeepSeek-V3.2's sparse attention (indexer.py, MLA's DSA path): parity with transformers'
DeepseekV32ForCausalLM at contexts beyond index_topk, the engine's sparse decode on slots and pages,
the indexer's key in the cache, and the warm-up objective."""

import json
import warnings

import pytest
import torch
from conftest import paged_greedy, randomize_, transformers_model

from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.estimate import estimate, report
from nanoseek.indexer import indexer_kl, indexer_loss, set_stage
from nanoseek.inference import Engine, SamplingParams

transformers = pytest.importorskip("transformers")

V32 = dict(model_type="deepseek_v32", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
           num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=12, first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=8,
           n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
           num_nextn_predict_layers=1, rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=32,
           mscale=0.9, mscale_all_dim=0.7, max_position_embeddings=128, index_topk=8, index_head_dim=16,
           index_n_heads=8)


def v32(**kw):
    return randomize_(Transformer(ModelConfig(**{**V32, **kw}))).eval()


def hf_from(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_logits_match_transformers_beyond_index_topk(tmp_path, one_thread):
    model = v32()
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["index_topk"] == 8
    hf = hf_from(tmp_path)
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    x = torch.randint(0, 96, (2, 40))  # 40 tokens, 8 chosen per query: most queries are sparse
    with torch.no_grad():
        ref, ours = hf(x).logits, model(x)
        dense = Transformer(model.config.replace(index_topk=64))
        dense.load_state_dict(model.state_dict())
        dense_logits = dense.eval()(x)
    assert (ours - ref).abs().max() < 1e-4
    assert ours.abs().max() > 1e-2
    assert (dense_logits - ref)[:, 8:].abs().max() > 1e-3  # the selection matters: dense MLA differs
    assert (dense_logits - ref)[:, :8].abs().max() < 1e-4  # and is exact while k covers the context


def test_transformers_saved_model_loads_and_saves_back(tmp_path, one_thread):
    cfg = ModelConfig(**{**V32, "num_nextn_predict_layers": 0})
    hf = transformers_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 96, (1, 30))
    model = load_pretrained(tmp_path / "hf")
    assert model.config.model_type == "deepseek_v32" and model.config.index_n_heads == 8
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max() < 1e-4
        save_pretrained(model, tmp_path / "ours")
        assert (hf_from(tmp_path / "ours")(x).logits - ref).abs().max() < 1e-4


def full_forward_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_engine_sparse_decode_equals_full_forward_on_slots_and_pages(one_thread):
    model = v32(index_topk=6)
    prompts = [list(range(10, 31)), [5, 6, 7], list(range(40, 52))]
    want = [full_forward_greedy(model, p, 14) for p in prompts]
    engine = Engine(model)
    assert [c.tokens for c in engine.generate(prompts, 14)] == want  # slots, one ragged batch
    cfg = model.config
    assert cfg.cache_width == 16 + 8 + 16  # latent, rotary key, indexer key
    assert paged_greedy(engine, prompts, 14) == want


def test_decoding_gathers_only_the_chosen_latents(one_thread, monkeypatch):
    import nanoseek.attention as attention
    model = v32(index_topk=4)
    seen = []
    real = attention.gather_chosen
    monkeypatch.setattr(attention, "gather_chosen", lambda kv, idx, allowed, w: seen.append(idx.shape) or
                        real(kv, idx, allowed, w))
    x = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        expanded = model(x)
        assert not seen  # a 20-token prefill is masked, not gathered
        absorbed = model(x[:, :19])[0, -1], model(x, absorb=True)[0, -1]
    assert not seen  # T * k > S: the absorbed prefill masks too
    assert (expanded[0, -1] - absorbed[1]).abs().max() < 1e-4
    engine = Engine(model)
    engine.generate([x[0].tolist()], 2)
    assert seen and all(s[-1] == 4 for s in seen)  # decode steps read k latents per query


def test_presets_and_cache_bytes_per_token():
    cfg = ModelConfig.preset("deepseek-v3.2")
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (2048, 64, 128)
    assert cfg.cache_width == 512 + 64 + 128
    e = estimate(cfg)
    assert e.kv_cache_bytes_per_token == 704 * 61 * 2 and e.index_cache_bytes_per_token == 128 * 61 * 2
    text = report(cfg, context=131072, batch=1)
    assert "indexer keys" in text and "128k context" in text
    assert ModelConfig.preset("deepseek-v3").cache_width == 576  # V3 has no indexer key
    assert "index_topk" not in ModelConfig.preset("deepseek-v3").to_hf()
    with pytest.raises(ValueError, match="q_lora_rank"):
        ModelConfig(**{**V32, "q_lora_rank": None})


def test_kl_is_zero_for_a_matching_indexer_and_positive_otherwise():
    allowed = torch.ones(1, 2, 5, dtype=torch.bool).tril(3)
    scores = torch.randn(1, 2, 5)
    target = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    assert indexer_kl(scores, target, allowed).abs() < 1e-6
    assert indexer_kl(torch.randn(1, 2, 5), target, allowed) > 0


def test_warmup_lowers_the_kl_and_touches_only_the_indexers(one_thread):
    torch.manual_seed(0)
    model = v32().train()
    indexers = set_stage(model, "warmup")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for m in indexers for q in m.parameters()) for p in trainable)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "indexer" not in k}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x = torch.randint(0, 96, (4, 32))
    kls = []
    for _ in range(25):
        model.forward_train(x)
        loss = indexer_loss(indexers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(loss.item())
    assert kls[-1] < 0.7 * kls[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    # sparse stage: the language-model loss does not reach the indexer (its input is detached)
    set_stage(model, "sparse")
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    hidden, _ = model.forward_train(x)
    hidden.sum().backward()
    assert all(p.grad is None or not p.grad.any() for m in indexers for p in m.parameters())
    assert model.model.layers[0].self_attn.q_a_proj.weight.grad is not None
    hidden, _ = model.forward_train(x)
    loss = indexer_loss(indexers)
    assert loss is not None and loss > 0
    set_stage(model, None)


def test_pretrain_option_runs_the_warmup_then_the_sparse_stage(tmp_path, one_thread):
    from nanoseek.data import pack_documents
    from nanoseek.train.loop import TrainConfig, train
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 96, (40,), generator=g).tolist() for _ in range(4)]
    rows = pack_documents(docs, seq_len=40, eos_id=1, pad_id=0)
    model = v32(num_nextn_predict_layers=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=0, weight_decay=0.0, progress=False)
    train(model, rows, TrainConfig(steps=8, indexer_stage="warmup", **kw), tmp_path / "warmup")
    rows_logged = [json.loads(line) for line in open(tmp_path / "warmup" / "metrics.jsonl")]
    kl = [r["indexer_loss"] for r in rows_logged]
    assert kl[-1] < kl[0]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".indexer." in k for k in changed)  # the warm-up moves only the indexers
    train(model, rows, TrainConfig(steps=2, indexer_stage="sparse", **kw), tmp_path / "sparse")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".indexer." not in k for k in changed)  # the sparse stage trains the model too
    assert load_pretrained(tmp_path / "sparse").config.model_type == "deepseek_v32"


def test_fp8_checkpoint_and_int8_quantization_run_the_sparse_model(tmp_path, one_thread):
    from nanoseek.quant.convert import convert_checkpoint
    model = v32(num_nextn_predict_layers=0, q_lora_rank=32)  # torch's int8 CPU kernel crashes on 24 inputs
    save_pretrained(model, tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "fp8", "fp8", progress=False)  # the indexer's linears too
    x = torch.randint(0, 96, (1, 30))
    fp8 = load_pretrained(tmp_path / "fp8", dtype=torch.float32)  # dequantized on load, as DeepSeek ships V3.2
    for name in ("wq_b", "wk", "weights_proj"):
        w0 = getattr(model.model.layers[1].self_attn.indexer, name).weight
        w1 = getattr(fp8.model.layers[1].self_attn.indexer, name).weight
        assert ((w1 - w0).abs() <= w0.abs() * 2 ** -4 + 1e-3).all() and not torch.equal(w0, w1)
    assert Engine(fp8).generate([x[0].tolist()], 6)[0].tokens == full_forward_greedy(fp8, x[0].tolist(), 6)
    int8 = load_pretrained(tmp_path / "fp8", quantize="int8")
    assert type(int8.model.layers[0].self_attn.indexer.wq_b).__name__ != "Linear"  # held quantized
    out = Engine(int8).generate([x[0].tolist()], 5)[0].tokens
    assert len(out) == 5


def test_the_server_core_and_the_commands_run_a_v32_checkpoint(tmp_path, capsys, one_thread):
    """serve's scheduler (paged pool under preemption, chunked prefill, prefix pages) gives the engine's
    tokens with DSA; `nanoseek quantize` and `nanoseek generate` take a V3.2 checkpoint."""
    from nanoseek import cli
    from nanoseek.inference.scheduler import Scheduler
    from nanoseek.tokenizer import Tokenizer
    model = v32(vocab_size=300, eos_token_id=None, index_topk=5, q_lora_rank=32)
    engine = Engine(model)
    cfg = model.config
    budget = 24 * (cfg.num_hidden_layers + 1) * 4 * cfg.cache_width * 4  # 24 pages of 4 tokens, fp32
    sched = Scheduler(engine, max_batch=4, block=4, kv_cache_bytes=budget, max_batched_tokens=6,
                      prefix_cache_bytes=1 << 20)
    prompts = [list(range(5, 17)), [3], list(range(20, 29)), [40] * 20]
    events = [[] for _ in prompts]
    reqs = [sched.submit(p, SamplingParams(max_tokens=10 + i), ev.append)
            for i, (p, ev) in enumerate(zip(prompts, events))]
    for _ in range(10_000):
        if not sched.step() and sched.waiting == 0:
            break
    for ev, req, p in zip(events, reqs, prompts):
        assert [t for e in ev for t in e.token_ids] == full_forward_greedy(model, p, req.params.max_tokens)
    save_pretrained(model, tmp_path / "bf")
    Tokenizer.train(["12+30=42", "the answer is 42", "think first"] * 20, vocab_size=300).save_pretrained(tmp_path / "bf")
    assert cli.main(["quantize", "--model", str(tmp_path / "bf"), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    for path in ("bf", "q"):
        capsys.readouterr()
        assert cli.main(["generate", "--model", str(tmp_path / path), "--prompt", "the answer is 42, think first",
                         "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out.strip()


def test_a_v3_checkpoint_continues_as_v32_with_fresh_indexers(tmp_path, one_thread):
    """pretrain --model V3 --indexer-stage warmup: the V3 weights plus new indexers (the model's
    outputs are unchanged while the context fits in k), trained by the warm-up, saved as V3.2."""
    from nanoseek.cli import main
    from nanoseek.model import add_indexers
    from nanoseek.tokenizer import Tokenizer
    v3 = randomize_(Transformer(ModelConfig.preset("tiny").replace(vocab_size=300, num_nextn_predict_layers=0)),
                    scale=0.1).eval()
    v32_model = add_indexers(v3, index_topk=8, index_n_heads=2, index_head_dim=24).eval()
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(v3(x[:, :8]), v32_model(x[:, :8]))  # every token chosen: the dense model exactly
        assert not torch.allclose(v3(x), v32_model(x))  # beyond k the indexers choose
    save_pretrained(v3, tmp_path / "v3")
    Tokenizer.train(["12+30=42 and 7*6=42 " * 4] * 20, vocab_size=300).save_pretrained(tmp_path / "v3")
    assert main(["pretrain", "--model", str(tmp_path / "v3"), "--data", "arithmetic", "--out", str(tmp_path / "out"),
                 "--steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32",
                 "--indexer-stage", "warmup", "--index-topk", "8", "--index-n-heads", "2", "--index-head-dim", "24",
                 "--no-progress"]) == 0
    out = load_pretrained(tmp_path / "out")
    assert out.config.model_type == "deepseek_v32" and out.config.index_topk == 8
