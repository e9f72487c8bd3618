"""The engine with image prompts: the towers' tokens enter the cache like text (tiny random VL model)."""

import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from nanoseek.chat import chat_prompt  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.inference.batch import Batch  # noqa: E402
from nanoseek.inference.engine import Engine  # noqa: E402
from nanoseek.inference.sequence import SamplingParams, Sequence  # noqa: E402
from nanoseek.vision import VLConfig, VLModel  # noqa: E402
from nanoseek.vision.image import ImageProcessor  # noqa: E402
from nanoseek.vision.sam import SamConfig  # noqa: E402
from nanoseek.vision.siglip import SiglipConfig  # noqa: E402

IMG = 5


def tiny_vl(hybrid=True, seed=0, vocab=64, image_id=IMG, context=128):
    text = ModelConfig.family("llama", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    cfg = VLConfig(text=text, vision=SiglipConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=8),
                   high_res=SamConfig(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=8, mlp_dim=24, window_size=3,
                                      global_attn_indexes=[1]) if hybrid else None, image_token_id=image_id)
    torch.manual_seed(seed)
    vl = VLModel(cfg)
    with torch.no_grad():
        for p in vl.parameters():
            p.normal_(0, 0.3)
    return vl.eval()


def picture(seed):
    g = torch.Generator().manual_seed(seed)
    return PIL.fromarray(torch.randint(0, 256, (30, 50, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")


def greedy_reference(vl, prompt, images, n):
    low, high = ImageProcessor.for_config(vl.config)(images)
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = vl(torch.tensor([ids]), low, high)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("hybrid", [False, True])
def test_engine_generates_what_the_full_forward_predicts(hybrid):
    vl = tiny_vl(hybrid)
    engine = Engine(vl)
    one = [1, 7] + engine.image_slots() + [9, 10]
    two = [1] + engine.image_slots() + [8] + engine.image_slots() + [11]
    imgs = [[picture(0)], [picture(1), picture(2)]]
    outs = engine.generate([one, two], max_new_tokens=6, images=imgs)
    for prompt, im, out in zip([one, two], imgs, outs):
        want = greedy_reference(vl, prompt, im, 6)
        assert out.tokens == want[:len(out.tokens)]
        assert len(out.tokens) == 6 or out.finish_reason == "stop"


def test_chunked_prefill_and_identical_prompts_with_different_images():
    vl = tiny_vl()
    engine = Engine(vl)
    prompt = [1, 7] + engine.image_slots() + [9, 10]
    want = [greedy_reference(vl, prompt, [picture(k)], 4) for k in (3, 4)]
    batch = Batch(engine, 2, 64, max_batched_tokens=7)  # the prompt enters in chunks of 7
    seqs = [Sequence(prompt, SamplingParams(4)) for _ in range(2)]
    for s, k in zip(seqs, (3, 4)):
        engine.attach_images(s, [picture(k)])
    batch.admit(seqs)
    while batch.rows:
        batch.step()
        batch.leave()
    assert [s.out for s in seqs] == want
    assert want[0] != want[1]  # different images, different answers: nothing was shared


def test_image_counts_are_checked_and_chat_prompt_takes_image_pieces():
    engine = Engine(tiny_vl())
    prompt = [1] + engine.image_slots()
    with pytest.raises(ValueError, match="no images"):
        engine.generate([prompt], 2)
    with pytest.raises(ValueError, match="2 images need 2 x 16"):
        engine.generate([prompt], 2, images=[[picture(0), picture(1)]])
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train(["a red square", "how many circles"], vocab_size=300)
    ids, _ = chat_prompt(tok, [{"role": "user", "content": [engine.image_slots(), "what is this?"]}])
    piece = engine.image_slots() + tok.encode_text("what is this?")
    assert any(ids[i:i + len(piece)] == piece for i in range(len(ids)))


def test_cli_generate_and_chat_with_image(tmp_path, capsys, monkeypatch):
    import io
    from nanoseek import cli
    from nanoseek.hf.vl import save_vl
    from nanoseek.tokenizer import Tokenizer
    vl = tiny_vl(vocab=320, image_id=310)
    save_vl(vl, tmp_path / "vl")
    Tokenizer.train(["a red square", "how many circles", "what colour"] * 5, vocab_size=300).save_pretrained(tmp_path / "vl")
    png = tmp_path / "x.png"
    picture(0).save(png)
    argv = ["generate", "--model", str(tmp_path / "vl"), "--prompt", "what colour", "--max-new-tokens", "5"]
    assert cli.main(argv + ["--image", str(png)]) == 0
    with_image = capsys.readouterr().out
    engine = Engine.from_pretrained(str(tmp_path / "vl"))
    tok = engine.tokenizer
    ids = [tok.bos_id] + engine.image_slots() + tok.encode("what colour")
    want = engine.generate([ids], 5, images=[[picture(0)]])[0].tokens
    assert with_image == "what colour" + tok.decode(want) + "\n"
    bad = tmp_path / "bad.png"
    bad.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        cli.main(argv + ["--image", str(bad)])
    monkeypatch.setattr("sys.stdin", io.StringIO("what colour\n/exit\n"))
    assert cli.main(["chat", "--model", str(tmp_path / "vl"), "--image", str(png), "--max-new-tokens", "3"]) == 0
