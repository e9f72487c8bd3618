"""Offline conversion and quantized checkpoints (quant/convert.py): `nanoseek quantize`, sizes on disk,
DeepSeek's FP8 layout both ways, the error report, loading int8/int4 kept quantized, clear errors."""

import json

import pytest
import torch
from conftest import tokens
from safetensors.torch import load_file, save_file

from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.cli import main as cli
from nanoseek.inference import Engine
from nanoseek.hf import CheckpointError, hf_state_dict
from nanoseek.quant.convert import convert_checkpoint
from nanoseek.quant.formats import fp8_block_quantize
from nanoseek.quant.modules import Int4Experts, Int4Linear, Int8Experts, Int8Linear

# Wide enough that the kept embeddings, norms and routers do not dominate the bytes on disk.
WIDE = dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny").replace(**kw)).eval()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A saved fp32 checkpoint (with its MTP layer) and its int8 / int4 conversions, made once."""
    root = tmp_path_factory.mktemp("quant")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as _one_thread, which a module-scoped fixture runs outside of
    model = build(**WIDE)
    save_pretrained(model, root / "fp32")
    (root / "fp32" / "tokenizer.json").write_text("{}")
    assert cli(["quantize", "--model", str(root / "fp32"), "--to", "int8", "--out", str(root / "int8")]) == 0
    convert_checkpoint(root / "fp32", root / "int4", "int4", group_size=64, progress=False)
    torch.set_num_threads(n)
    return model, root


def disk_bytes(path):
    return sum(f.stat().st_size for f in path.glob("model*.safetensors"))


def tensors(path):
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


# ----------------------------------------------------------------------------- int8 / int4 checkpoints

def test_int8_checkpoint_size_config_and_files(wide):
    model, root = wide
    ratio = disk_bytes(root / "int8") / disk_bytes(root / "fp32")
    assert ratio <= 0.35, ratio
    assert disk_bytes(root / "int4") < 0.8 * disk_bytes(root / "int8")
    config = json.loads((root / "int8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "int8",
                                             "modules_to_not_convert": ["embed_tokens", "gate", "kv_b_proj"]}
    assert json.loads((root / "int4" / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert (root / "int8" / "tokenizer.json").read_text() == "{}"  # the source's other files come along
    t = tensors(root / "int8")
    assert t["model.layers.1.self_attn.q_a_proj.weight"].dtype == torch.int8
    assert t["model.layers.1.self_attn.q_a_proj.weight_scale"].shape == (128,)
    # kept high precision (bf16 by default), untouched by quantization
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.input_layernorm.weight"):
        assert t[key].dtype == torch.bfloat16 and key + "_scale" not in t, key
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_every_expert_converted_and_reported(wide, fmt):
    model, root = wide
    cfg = model.config
    t = tensors(root / fmt)
    report = json.loads((root / fmt / "quantization_report.json").read_text())
    assert report["format"] == fmt and report["source_format"] == "float"
    stored = torch.int8 if fmt == "int8" else torch.uint8
    bound = 0.01 if fmt == "int8" else 0.12  # formats.py's bounds for Gaussian weights
    n_moe = 0
    for layer in range(1, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):  # MTP layer included
        for e in range(cfg.n_routed_experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"
                assert t[key].dtype == stored, key
                assert 0 < report["tensors"][key]["rel_error"] < bound, key
                n_moe += 1
    assert n_moe == 4 * 8 * 3
    # the report covers exactly the converted tensors
    assert set(report["tensors"]) == {k for k, v in t.items() if v.dtype == stored}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_load_keeps_weights_quantized_and_logits_close(wide, fmt):
    model, root = wide
    loaded = load_pretrained(root / fmt)
    lin, exp = (Int8Linear, Int8Experts) if fmt == "int8" else (Int4Linear, Int4Experts)
    assert isinstance(loaded.model.layers[2].self_attn.o_proj, lin) and isinstance(loaded.lm_head, lin)
    assert all(isinstance(m.experts, exp) for m in loaded.moe_layers())
    assert loaded.model.embed_tokens.weight.dtype == torch.float32  # the source's torch_dtype
    x = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    rel = float((b - a).norm() / a.norm())
    # int8: the 3%. int4 (g=64, ~9% noise per weight, compounding over 4 random layers): 35%
    assert rel < (0.03 if fmt == "int8" else 0.35), rel
    out = tokens(Engine(loaded).generate([[1, 2, 3]], 6))
    assert len(out[0]) == 6


def test_int8_to_int4_requantizes(wide, tmp_path):
    _, root = wide
    report = convert_checkpoint(root / "int8", tmp_path / "i4", "int4", group_size=128, progress=False)
    assert json.loads((tmp_path / "i4" / "quantization_report.json").read_text())["source_format"] == "int8"
    assert report and isinstance(load_pretrained(tmp_path / "i4").lm_head, Int4Linear)


def test_sharded_source_keeps_its_shards(tmp_path):
    model = build()
    save_pretrained(model, tmp_path / "src", max_shard_size="300KB")
    n_src = len(list((tmp_path / "src").glob("model-*.safetensors")))
    assert n_src > 2
    convert_checkpoint(tmp_path / "src", tmp_path / "q", "int8", progress=False)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n_src
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale" in index["weight_map"]
    assert isinstance(load_pretrained(tmp_path / "q").lm_head, Int8Linear)


# ----------------------------------------------------------------------------- FP8 both ways

def deepseek_fp8(model, path):
    """Save `model` as DeepSeek-V3 ships: every projection in e4m3 with fp32 weight_scale_inv
    [ceil(out/128), ceil(in/128)]; embeddings, router, output head and norms in bf16; the balancing
    bias in fp32."""
    fp8 = {}
    for k, t in hf_state_dict(model).items():
        if t.dim() == 2 and not any(s in k for s in ("embed_tokens", "mlp.gate.", "lm_head", "shared_head.head")):
            fp8[k], fp8[k + "_scale_inv"] = fp8_block_quantize(t)
        elif k.endswith("e_score_correction_bias"):
            fp8[k] = t.float()
        else:
            fp8[k] = t.bfloat16()
    cfg = model.config.to_hf()
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    cfg["torch_dtype"] = "bfloat16"
    save_pretrained(model, path, tensors=fp8, config=cfg)
    return fp8


def test_fp8_to_bf16_to_fp8_reproduces_deepseek_layout(tmp_path):
    model = build(**WIDE)  # 256 wide: some matrices span several 128-blocks, some end in a partial one
    src = deepseek_fp8(model, tmp_path / "fp8")
    assert cli(["quantize", "--model", str(tmp_path / "fp8"), "--to", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    mid = tensors(tmp_path / "bf16")
    assert not any(k.endswith("_scale_inv") for k in mid) and all(
        v.dtype == torch.bfloat16 for k, v in mid.items() if not k.endswith("e_score_correction_bias"))
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    convert_checkpoint(tmp_path / "bf16", tmp_path / "fp8b", "fp8", progress=False)
    back = tensors(tmp_path / "fp8b")
    assert back.keys() == src.keys()
    for k, t in src.items():
        assert back[k].shape == t.shape and back[k].dtype == t.dtype, k
        if k.endswith("_scale_inv"):
            n, m = src[k[:-len("_scale_inv")]].shape
            assert t.shape == (-(-n // 128), -(-m // 128))
            # a block's largest value went through bf16 once: its scale moves by at most bf16's half step
            assert torch.allclose(back[k], t, rtol=2 ** -8, atol=0), k
        elif t.dtype == torch.float8_e4m3fn:
            agree = (back[k].float() == t.float()).float().mean()
            assert agree > 0.97, (k, float(agree))  # codes move only where bf16 rounding crossed an e4m3 step
        else:
            assert torch.equal(back[k], t), k
    config = json.loads((tmp_path / "fp8b" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((tmp_path / "fp8" / "config.json").read_text())[
        "quantization_config"]
    assert load_pretrained(tmp_path / "fp8b").model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16


def test_fp8_source_to_int8(tmp_path):
    model = build()
    deepseek_fp8(model, tmp_path / "fp8")
    report = convert_checkpoint(tmp_path / "fp8", tmp_path / "int8", "int8", progress=False)
    assert report["model.layers.1.mlp.experts.7.down_proj.weight"]["rel_error"] < 0.01
    assert isinstance(load_pretrained(tmp_path / "int8").model.layers[1].mlp.experts, Int8Experts)


# ----------------------------------------------------------------------------- clear errors

@pytest.fixture
def small_int8(tmp_path):
    save_pretrained(build(), tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "q", "int8", progress=False)
    return tmp_path / "q"


def _edit(path, fn):
    t = load_file(path / "model.safetensors")
    fn(t)
    save_file(t, path / "model.safetensors")


def test_truncated_shard_is_named(small_int8):
    f = small_int8 / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_pretrained(small_int8)


def test_missing_scale_is_named(small_int8):
    _edit(small_int8, lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight_scale"))
    with pytest.raises(CheckpointError, match=r"experts\.5\.down_proj\.weight_scale is missing"):
        load_pretrained(small_int8)


def test_scale_of_wrong_shape_is_named(small_int8):
    def bad(t):
        t["model.layers.1.self_attn.o_proj.weight_scale"] = torch.ones(7)
    _edit(small_int8, bad)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale has shape \(7,\), the config implies \(128,\)"):
        load_pretrained(small_int8)


def test_config_claiming_int4_over_int8_tensors(small_int8):
    config = json.loads((small_int8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "int4", "group_size": 64,
                                     "modules_to_not_convert": ["embed_tokens", "gate", "kv_b_proj"]}
    (small_int8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: [\w.]+\.weight has dtype torch\.int8; "
                                              r"an int4 checkpoint stores it as torch\.uint8"):
        load_pretrained(small_int8)


def test_missing_quantized_weight_is_named(small_int8):
    _edit(small_int8, lambda t: t.pop("model.layers.3.mlp.experts.0.gate_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*experts\.0\.gate_proj\.weight"):
        load_pretrained(small_int8)


def test_converting_a_broken_fp8_source_is_named(tmp_path):
    deepseek_fp8(build(), tmp_path / "fp8")
    _edit(tmp_path / "fp8", lambda t: t.pop("model.layers.2.self_attn.q_b_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"q_b_proj\.weight .*q_b_proj\.weight_scale_inv is missing"):
        convert_checkpoint(tmp_path / "fp8", tmp_path / "out", "bf16", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_arguments(tmp_path, capsys):
    save_pretrained(build(), tmp_path / "src")
    assert cli(["quantize", "--model", str(tmp_path / "src"), "--to", "int4", "--group-size", "100",
                "--out", str(tmp_path / "q")]) == 2
    assert "--group-size 100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is the source checkpoint"):
        convert_checkpoint(tmp_path / "src", tmp_path / "src", "int8")
