"""Vision towers, fusion and preprocessing against transformers' DeepSeek-VL (tiny, fp32, every weight random)."""

import io

import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from nanoseek.hf.vl import load_vl, save_vl  # noqa: E402
from nanoseek.vision import VLConfig, VLModel  # noqa: E402
from nanoseek.vision.image import ImageError, ImageLimits, ImageProcessor, decode_image  # noqa: E402

IMG = 5  # image_token_id in the tiny vocabulary
TEXT = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=2, image_size=32, patch_size=8)
SAM = dict(model_type="sam_vision_model", hidden_size=16, output_channels=8, num_hidden_layers=3,
           num_attention_heads=2, image_size=64, patch_size=8, window_size=3, global_attn_indexes=[1], mlp_dim=24)


def hf_config(hybrid: bool):
    kw = dict(text_config=TEXT, vision_config=SIGLIP, image_token_id=IMG, tie_word_embeddings=False)
    if hybrid:
        return transformers.DeepseekVLHybridConfig(high_res_vision_config=SAM, **kw)
    return transformers.DeepseekVLConfig(**kw)


def hf_model(hybrid: bool):
    cls = transformers.DeepseekVLHybridForConditionalGeneration if hybrid else \
        transformers.DeepseekVLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(hf_config(hybrid)).eval()
    with torch.no_grad():
        for p in model.parameters():  # every weight random, alpha and relative positions included
            p.normal_(0.0, 0.15)
    return model


def hf_processor(hybrid: bool):
    if hybrid:
        return transformers.DeepseekVLHybridImageProcessorPil(size={"height": 32, "width": 32},
                                                              high_res_size={"height": 64, "width": 64})
    return transformers.DeepseekVLImageProcessorPil(size={"height": 32, "width": 32})


def picture(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return PIL.fromarray(data, "RGB")


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


PICTURES = [(64, 64), (97, 41), (30, 123), (1000, 700), (13, 9)]


@pytest.mark.parametrize("hybrid", [False, True])
def test_preprocessing_matches_reference(hybrid):
    ours = ImageProcessor(size=32, high_res_size=64 if hybrid else None)
    for i, (w, h) in enumerate(PICTURES):
        img = decode_image(png_bytes(picture(w, h, i)))
        ref = hf_processor(hybrid)(images=[img], return_tensors="pt")
        low, high = ours([img])
        assert low.shape == ref["pixel_values"].shape
        torch.testing.assert_close(low, ref["pixel_values"], atol=1e-5, rtol=0)
        if hybrid:
            torch.testing.assert_close(high, ref["high_res_pixel_values"], atol=1e-5, rtol=0)
        else:
            assert high is None


def prompt(n_images, n_tokens=16):
    ids = [1, 7]
    for k in range(n_images):
        ids += [IMG] * n_tokens + [9 + k, 11]
    return torch.tensor([ids + [3, 4]])


@pytest.mark.parametrize("hybrid", [False, True])
def test_logits_match_transformers_and_round_trip(hybrid, tmp_path):
    ref = hf_model(hybrid)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_vl(tmp_path / "hf")
    assert ours.config.model_type == ("deepseek_vl_hybrid" if hybrid else "deepseek_vl")
    assert ours.config.num_image_tokens == 16
    proc = ImageProcessor(size=32, high_res_size=64 if hybrid else None)
    for n in (1, 2):
        low, high = proc([picture(50 + 20 * k, 40, k) for k in range(n)])
        ids = prompt(n)
        kw = dict(high_res_pixel_values=high) if hybrid else {}
        with torch.no_grad():
            want = ref(input_ids=ids, pixel_values=low, **kw).logits
            got = ours(ids, low, high)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # nanoseek -> transformers -> nanoseek
    save_vl(ours, tmp_path / "ns")
    cls = type(ref)
    back = cls.from_pretrained(tmp_path / "ns").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=low, **kw).logits, want, atol=1e-4, rtol=0)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)
    again = load_vl(tmp_path / "ns")
    with torch.no_grad():
        torch.testing.assert_close(again(ids, low, high), got, atol=0, rtol=0)


def test_image_count_must_match_placeholders():
    cfg = VLConfig.from_hf(hf_config(True).to_dict())
    vl = VLModel(cfg).eval()
    low, high = ImageProcessor.for_config(cfg)([picture(40, 40)])
    with pytest.raises(ValueError, match="32 image positions but the images give 16"):
        vl(prompt(2), low, high)
    with pytest.raises(ValueError, match="no images"):
        vl(prompt(1))


def test_decode_image_refuses_bad_data():
    good = png_bytes(picture(20, 10))
    assert decode_image(good).size == (20, 10)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"hello")
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(good, ImageLimits(max_pixels=100))
    buf = io.BytesIO()
    picture(8, 8).save(buf, format="BMP")
    with pytest.raises(ImageError, match="BMP is not accepted"):
        decode_image(buf.getvalue())


def test_estimate_covers_the_vl_presets(capsys):
    from nanoseek import cli
    from nanoseek.vision.vl import vl_preset
    hybrid = vl_preset("deepseek-vl-7b")
    assert hybrid.model_type == "deepseek_vl_hybrid" and hybrid.num_image_tokens == 576
    assert vl_preset("deepseek-vl-1.3b").high_res is None
    assert cli.main(["estimate", "--preset", "deepseek-vl-7b"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deepseek_vl_hybrid: 7.3") and "SAM-B" in out and "576 prompt tokens" in out


def test_the_checkpoints_preprocessor_config_is_used(tmp_path):
    import json
    from nanoseek.hf.vl import load_image_processor
    cfg = VLConfig.from_hf(hf_config(True).to_dict())
    assert load_image_processor(tmp_path, cfg) == ImageProcessor(size=32, high_res_size=64)
    ref = hf_processor(True)
    ref.image_mean = [0.5, 0.5, 0.5]
    ref.image_std = [0.5, 0.5, 0.5]
    ref.save_pretrained(tmp_path)
    ours = load_image_processor(tmp_path, cfg)
    assert ours.image_mean == (0.5, 0.5, 0.5) and ours.size == 32 and ours.high_res_size == 64
    img = picture(77, 50)
    torch.testing.assert_close(ours([img])[0], transformers.DeepseekVLHybridImageProcessorPil.from_pretrained(
        tmp_path)(images=[img], return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
