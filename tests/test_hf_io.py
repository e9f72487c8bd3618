"""Checkpoint I/O (hf/io.py): round trips, FP8 blocks, shards, atomic writes, and clear errors on bad files."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize_
from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.hf import CheckpointError, hf_state_dict
from nanoseek.quant.formats import fp8_block_dequantize, fp8_block_quantize


def tiny(**kw):
    return randomize_(Transformer(ModelConfig.preset("tiny").replace(**kw))).eval()


def test_save_load_bit_exact_with_mtp(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    n = model.config.num_hidden_layers
    for key in ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.experts.7.gate_proj.weight",
                "model.layers.1.mlp.gate.e_score_correction_bias", f"model.layers.{n}.eh_proj.weight",
                f"model.layers.{n}.enorm.weight", f"model.layers.{n}.shared_head.head.weight"):
        assert key in keys, key
    loaded = load_pretrained(tmp_path)
    assert loaded.config.num_nextn_predict_layers == 1
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k


def test_sharded_round_trip_with_index(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path, max_shard_size="1MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    loaded = load_pretrained(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_resave_keeps_other_files_and_replaces_shards(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path, max_shard_size="1MB")
    (tmp_path / "tokenizer.json").write_text("{}")
    save_pretrained(model, tmp_path)  # now a single file: stale shards must go
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert not list(tmp_path.glob("model-*.safetensors"))
    assert load_pretrained(tmp_path) is not None


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    save_pretrained(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import nanoseek.hf.io as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(tiny(), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.parent.iterdir() if ".tmp-" in p.name] == []


def test_fp8_block_quantize_round_trip():
    w = torch.randn(300, 200)
    q, s = fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = fp8_block_dequantize(q, s, dtype=torch.float32)
    # e4m3 has 3 mantissa bits: relative error per element <= 2^-4, plus underflow near 0
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + s.max() * 2 ** -9).all()


def test_fp8_checkpoint_loads_like_deepseek_ships_it(tmp_path):
    model = tiny()
    tensors = hf_state_dict(model)
    fp8 = {}
    for k, t in tensors.items():
        if k.endswith("proj.weight") and ".mlp.gate." not in k:
            fp8[k], fp8[k + "_scale_inv"] = fp8_block_quantize(t)
        else:
            fp8[k] = t
    cfg = model.config.to_hf()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    cfg["torch_dtype"] = "bfloat16"
    save_pretrained(model, tmp_path, tensors=fp8, config=cfg)
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    w0 = model.model.layers[1].self_attn.kv_b_proj.weight
    w1 = loaded.model.layers[1].self_attn.kv_b_proj.weight
    assert ((w1 - w0).abs() <= w0.abs() * 2 ** -4 + 1e-3).all() and not torch.equal(w0, w1)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    # bound: e4m3 weight noise (<= 6% per element) keeps the logits' relative RMS error under 20% on this random 4-layer MoE;
    # the max is looser because noise may flip a token's expert choice.
    rel = (a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()
    assert rel < 0.20, float(rel)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    assert load_pretrained(tmp_path).model.embed_tokens.weight.dtype == torch.bfloat16  # fp8 -> bf16 default


def test_missing_tensor_is_named(tmp_path):
    save_pretrained(tiny(), tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    del t["model.layers.2.self_attn.o_proj.weight"]
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.2\.self_attn\.o_proj\.weight"):
        load_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    save_pretrained(tiny(), tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    t["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 5)
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight has shape \(5, 5\)"):
        load_pretrained(tmp_path)


def test_wrong_dtype_is_named(tmp_path):
    save_pretrained(tiny(), tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    t["model.norm.weight"] = torch.ones(128, dtype=torch.int64)
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype torch\.int64"):
        load_pretrained(tmp_path)


def test_unexpected_tensor_error_and_opt_out(tmp_path):
    save_pretrained(tiny(), tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    t["model.layers.0.self_attn.extra_proj.weight"] = torch.ones(8)
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.self_attn.extra_proj.weight"):
        load_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_pretrained(tmp_path, allow_unexpected=True) is not None


@pytest.mark.parametrize("cut", [4, 1000, -50])
def test_truncated_file_is_named(tmp_path, cut):
    save_pretrained(tiny(), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_pretrained(tmp_path)


def test_no_weights_and_no_pickle(tmp_path):
    save_pretrained(tiny(), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_pretrained(tmp_path)


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny(tie_word_embeddings=True, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 1024, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


# ----------------------------------------------------------------------------- quantize on load

@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_on_load_equals_converting_then_loading_bit_for_bit(tmp_path, fmt):
    from nanoseek.quant.convert import convert_checkpoint
    save_pretrained(randomize_(tiny(), scale=0.1).to(torch.bfloat16), tmp_path / "src", max_shard_size="40KB")
    convert_checkpoint(tmp_path / "src", tmp_path / fmt, fmt, group_size=32, progress=False)
    stored = load_pretrained(tmp_path / fmt)
    on_load = load_pretrained(tmp_path / "src", quantize=fmt, group_size=32)
    a, b = stored.state_dict(), on_load.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert on_load.config.quantization_config == stored.config.quantization_config
    assert any(t.dtype in (torch.int8, torch.uint8, torch.int32) for t in b.values())  # really held quantized


def test_quantize_on_load_reads_an_fp8_checkpoint_and_refuses_what_it_cannot_do(tmp_path):
    from nanoseek.quant.convert import convert_checkpoint
    save_pretrained(randomize_(tiny(), scale=0.1), tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "fp8", "fp8", progress=False)
    via_fp8 = load_pretrained(tmp_path / "fp8", quantize="int8")
    x = torch.tensor([[1, 2, 3, 4, 5]])
    ref = load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    assert (via_fp8(x) - ref(x)).abs().max() < 0.05 * ref(x).abs().max()
    with pytest.raises(ValueError, match="int8 or int4"):
        load_pretrained(tmp_path / "src", quantize="fp8")
    convert_checkpoint(tmp_path / "src", tmp_path / "int8", "int8", progress=False)
    with pytest.raises(ValueError, match="nanoseek quantize --to int4"):
        load_pretrained(tmp_path / "int8", quantize="int4")
