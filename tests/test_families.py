"""The dense and first-MoE DeepSeek families against their references: Llama and Qwen2 against
transformers' LlamaForCausalLM / Qwen2ForCausalLM (every weight random, fp32), each RoPE scaling,
checkpoints both ways, greedy decoding through the engine (slot and paged caches), and
DeepSeekMoE-16B against a reference assembled from transformers' Llama attention and DeepSeek-V2 MoE."""

import json
import warnings

import pytest
import torch
from conftest import paged_greedy, randomize_, transformers_model

from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.inference import Engine, SamplingParams

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=None)
ROPES = {
    "none": {},
    "linear": dict(rope_type="linear", rope_factor=4.0),  # DeepSeek-Coder's
    "llama3": dict(rope_type="llama3", rope_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),  # R1-Distill-Llama's, scaled down
    "yarn": dict(rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=32),
}
CASES = [  # (family, rope, extra fields): GQA with 2 key/value heads throughout
    ("llama", "none", dict(tie_word_embeddings=False)),
    ("llama", "linear", dict(tie_word_embeddings=True, attention_bias=True)),
    ("llama", "llama3", dict(tie_word_embeddings=False, head_dim=24)),
    ("llama", "yarn", dict(tie_word_embeddings=False)),
    ("qwen2", "none", dict(tie_word_embeddings=True)),
    ("qwen2", "yarn", dict(tie_word_embeddings=False, head_dim=8)),
]
IDS = [f"{f}-{r}-{'tied' if kw['tie_word_embeddings'] else 'untied'}" for f, r, kw in CASES]


def small(family, rope="none", **kw):
    return ModelConfig.family(family, **{**SMALL, **ROPES[rope], **kw})


def hf_from(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family,rope,kw", CASES, ids=IDS)
def test_nanoseek_saved_model_matches_transformers(family, rope, kw, tmp_path, one_thread):
    model = randomize_(Transformer(small(family, rope, **kw))).eval()
    save_pretrained(model, tmp_path)
    hf = hf_from(tmp_path)
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    x = torch.randint(0, 96, (2, 48))  # past every scaled rope's original context
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert (ours - ref).abs().max() < 1e-4
    assert ours.abs().max() > 1e-2
    if rope != "none":  # the scaling is in play: the unscaled model differs
        plain = Transformer(model.config.replace(rope_type="default")).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain(x) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_saved_model_loads_and_saves_back(family, tmp_path, one_thread):
    cfg = small(family, "llama3" if family == "llama" else "none", tie_word_embeddings=family == "qwen2")
    hf = transformers_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
    model = load_pretrained(tmp_path / "hf")
    assert model.config.model_type == family and model.config.kv_heads == 2
    with torch.no_grad():
        assert (model(x) - ref).abs().max() < 1e-4
    save_pretrained(model, tmp_path / "ours")  # and back: transformers reads nanoseek's save
    with torch.no_grad():
        assert (hf_from(tmp_path / "ours")(x).logits - ref).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_greedy_tokens_equal_transformers_generate(family, tmp_path, one_thread):
    model = randomize_(Transformer(small(family, "yarn" if family == "qwen2" else "llama3")), scale=0.1).eval()
    save_pretrained(model, tmp_path)
    hf = hf_from(tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 41))]
    engine = Engine(model)
    ours = [c.tokens for c in engine.generate(prompts, 12)]  # one batch, ragged prompts
    for p, got in zip(prompts, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert got == out[0, len(p):].tolist()
    # the paged cache holds per-head K/V the same way: the same tokens, pages shared across rows
    assert paged_greedy(engine, prompts, 12) == ours


def test_gqa_cache_width_and_bytes():
    cfg = small("qwen2")  # 2 key/value heads of 16
    assert cfg.cache_width == 2 * 2 * 16
    assert Engine(Transformer(cfg)).cache_bytes_per_token() == 64 * 2 * 4  # 2 layers, fp32
    r1 = ModelConfig.preset("r1-distill-qwen-1.5b")
    assert r1.cache_bytes_per_token(2) == 2 * 2 * 128 * 28 * 2  # 28 KiB/token in bf16


# ----------------------------------------------------------------------------- DeepSeekMoE-16B

MOE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=128, moe_intermediate_size=16, n_routed_experts=8,
           n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1,
           bos_token_id=0, eos_token_id=1)


def deepseek_moe_reference(model):
    """A forward of DeepSeekMoE-16B assembled from transformers' modules (no class ships for it):
    Llama's attention, norms, rotary and dense MLP, DeepSeek-V2's MoE (softmax, greedy top-k,
    shared experts), every weight copied from `model`."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as dv2
    from transformers.models.llama import modeling_llama as ll
    cfg = model.config
    lcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k in transformers.LlamaConfig()
                                       .to_dict() or k in ("rope_theta", "rope_scaling")})
    lcfg._attn_implementation = "eager"
    mcfg = transformers.DeepseekV2Config(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
                                         n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                                         num_experts_per_tok=cfg.num_experts_per_tok, topk_method="greedy",
                                         routed_scaling_factor=1.0, norm_topk_prob=False, n_group=1, topk_group=1)
    sd = model.state_dict()
    layers = []
    for i, block in enumerate(model.main_layers):
        p = f"model.layers.{i}."
        attn = ll.LlamaAttention(lcfg, i)
        attn.load_state_dict({k[len(p) + 10:]: v for k, v in sd.items() if k.startswith(p + "self_attn.")})
        if cfg.is_moe_layer(i):
            ffn = dv2.DeepseekV2Moe(mcfg)
            g = p + "mlp."
            with torch.no_grad():
                ffn.gate.weight.copy_(sd[g + "gate.weight"])
                ffn.experts.gate_up_proj.copy_(torch.cat((sd[g + "experts.gate_proj"], sd[g + "experts.up_proj"]), 1))
                ffn.experts.down_proj.copy_(sd[g + "experts.down_proj"])
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    getattr(ffn.shared_experts, proj).weight.copy_(sd[f"{g}shared_experts.{proj}.weight"])
        else:
            ffn = ll.LlamaMLP(lcfg)
            ffn.load_state_dict({k[len(p) + 4:]: v for k, v in sd.items() if k.startswith(p + "mlp.")})
        norms = [ll.LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps) for _ in range(2)]
        norms[0].weight.data.copy_(sd[p + "input_layernorm.weight"])
        norms[1].weight.data.copy_(sd[p + "post_attention_layernorm.weight"])
        layers.append((norms, attn, ffn))
    rotary = ll.LlamaRotaryEmbedding(lcfg)

    def forward(x):
        B, T = x.shape
        h = model.model.embed_tokens(x)
        pos = torch.arange(T).expand(B, T)
        cos_sin = rotary(h, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        for (n1, n2), attn, ffn in layers:
            h = h + attn(n1(h), cos_sin, mask)[0]
            h = h + ffn(n2(h))
        return model.lm_head(model.model.norm(h))
    return forward


def test_deepseek_moe_16b_matches_a_reference_built_from_transformers_modules(tmp_path, one_thread):
    model = randomize_(Transformer(ModelConfig.family("deepseek", **MOE))).eval()
    assert [type(b.mlp).__name__ for b in model.main_layers] == ["MLP", "MoE", "MoE"]
    x = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ours, ref = model(x), deepseek_moe_reference(model)(x)
    assert (ours - ref).abs().max() < 1e-4 and ours.abs().max() > 1e-2
    # saved in the published layout: DeepseekForCausalLM, per-expert keys, loads back exactly
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DeepseekForCausalLM"] and config["model_type"] == "deepseek"
    assert "kv_lora_rank" not in config and config["num_key_value_heads"] == 4
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
            "model.layers.1.mlp.gate.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.2.self_attn.k_proj.weight"} <= keys
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(x), ours)


# ----------------------------------------------------------------------------- the rest of the stack

def test_every_family_trains_through_the_shared_loop(tmp_path, one_thread):
    from nanoseek.data import pack_documents
    from nanoseek.train.loop import TrainConfig, train
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 48, (12,), generator=g).tolist() for _ in range(4)]
    rows = pack_documents(docs, seq_len=24, eos_id=1, pad_id=0)
    for family, kw in (("qwen2", {}), ("deepseek", {k: v for k, v in MOE.items() if "expert" in k or "moe" in k})):
        cfg = ModelConfig.family(family, **{**SMALL, "vocab_size": 48, **kw})
        model = Transformer(cfg)
        train(model, rows, TrainConfig(steps=30, batch_size=len(rows), micro_batch_size=len(rows), lr=1e-2,
                                        weight_decay=0.0, warmup_steps=2, progress=False), tmp_path / family)
        losses = [json.loads(line)["loss"] for line in open(tmp_path / family / "metrics.jsonl")]
        assert losses[-1] < losses[0] / 2, (family, losses[0], losses[-1])


def test_quantize_on_load_keeps_biases_and_the_logits(tmp_path, one_thread):
    from nanoseek.quant.modules import QuantLinear
    model = randomize_(Transformer(small("qwen2", hidden_size=128, intermediate_size=256))).eval()
    save_pretrained(model, tmp_path)
    q = load_pretrained(tmp_path, quantize="int8")
    proj = q.model.layers[0].self_attn.q_proj
    assert isinstance(proj, QuantLinear) and torch.equal(proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    x = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert [c.tokens for c in Engine(q).generate([[3, 4, 5]], 4)][0].__len__() == 4


def test_stored_rotary_frequencies_are_skipped(tmp_path):
    from safetensors.torch import load_file, save_file
    model = randomize_(Transformer(small("llama"))).eval()
    save_pretrained(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # as older Llama checkpoints hold
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    x = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(x), model(x))


def test_an_r1_distill_style_template_opens_think(tmp_path):
    """R1-Distill checkpoints ship their own chat template, whose generation prompt opens <think>;
    nanoseek renders the checkpoint's template (a stand-in written here) and says so."""
    from nanoseek.chat import chat_prompt
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
        "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_pretrained(tmp_path)
    ids, opens_think = chat_prompt(loaded, [{"role": "user", "content": "the fox"}])
    assert opens_think and loaded.decode(ids).endswith("<｜Assistant｜><think>\n")


def test_a_student_from_a_spec_is_a_standard_checkpoint(tmp_path, one_thread):
    """The library side of distilling into a Qwen2 student: a spec on the teacher's vocabulary builds a
    model that save_pretrained writes and transformers' Qwen2ForCausalLM runs to the same logits."""
    from nanoseek.config import is_spec
    teacher = ModelConfig.preset("tiny")
    spec = "qwen2:hidden=64,layers=2,heads=4,kv_heads=2,inter=128"
    assert is_spec(spec) and is_spec("tiny-qwen2:layers=2") and not is_spec("runs/student")
    cfg = ModelConfig.from_spec(spec, vocab_size=teacher.vocab_size, bos_token_id=teacher.bos_token_id,
                                eos_token_id=teacher.eos_token_id)
    student = randomize_(Transformer(cfg)).eval()
    save_pretrained(student, tmp_path)
    hf = hf_from(tmp_path)
    x = torch.randint(0, teacher.vocab_size, (1, 20))
    with torch.no_grad():
        assert type(hf).__name__ == "Qwen2ForCausalLM" and (hf(x).logits - student(x)).abs().max() < 1e-4
    assert ModelConfig.from_spec("tiny-qwen2:layers=2").num_hidden_layers == 2


def test_the_server_core_and_the_cli_run_a_qwen2_checkpoint(tmp_path, capsys, one_thread):
    """serve's scheduler (a paged K/V pool under preemption, prefix pages) gives the engine's tokens,
    and `nanoseek generate` loads a Qwen2 checkpoint with its tokenizer."""
    from nanoseek import cli
    from nanoseek.inference.scheduler import Scheduler
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train(["12+30=42", "the answer is 42", "think first"] * 20, vocab_size=300)
    cfg = ModelConfig.preset("tiny-qwen2").replace(vocab_size=300, eos_token_id=None, max_position_embeddings=256)
    model = randomize_(Transformer(cfg), scale=0.1).eval()
    engine = Engine(model)
    budget = 16 * cfg.num_hidden_layers * 4 * cfg.cache_width * 4  # 16 pages of 4 tokens, fp32
    sched = Scheduler(engine, max_batch=4, block=4, kv_cache_bytes=budget, max_batched_tokens=6,
                      prefix_cache_bytes=1 << 20)
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18], [40] * 20]
    events = [[] for _ in prompts]
    reqs = [sched.submit(p, SamplingParams(max_tokens=12 + i), ev.append)
            for i, (p, ev) in enumerate(zip(prompts, events))]
    for _ in range(10_000):
        if not sched.step() and sched.waiting == 0:
            break
    for ev, req, p in zip(events, reqs, prompts):
        assert [t for e in ev for t in e.token_ids] == engine.generate([p], req.params.max_tokens)[0].tokens
    assert sched.stats["preempted"] > 0
    save_pretrained(model, tmp_path)
    tok.save_pretrained(tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "12+30=", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_fim_is_offered_only_by_tokenizers_that_hold_coders_sentinels():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from nanoseek.tokenizer import Tokenizer
    coder_like = Tokenizer.train(["def f(x): return x"] * 10, vocab_size=300)  # holds <｜fim▁begin｜> ...
    plain = Tokenizer(HFTokenizer(models.BPE()))
    assert coder_like.has_fim and not plain.has_fim
