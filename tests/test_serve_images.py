"""`nanoseek serve` with a DeepSeek-VL model: image_url parts through the openai client, bad images as 400s."""

import base64
import io
import struct
import threading
import zlib

import pytest

openai = pytest.importorskip("openai")
PIL = pytest.importorskip("PIL.Image")

from test_vision_engine import picture, tiny_vl  # noqa: E402

from nanoseek.chat import chat_prompt  # noqa: E402
from nanoseek.hf.vl import save_vl  # noqa: E402
from nanoseek.inference import Engine  # noqa: E402
from nanoseek.inference.scheduler import Scheduler  # noqa: E402
from nanoseek.serve.api import create_app, serve_in_thread  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def huge_png(w=20000, h=20000) -> bytes:
    """A valid 1-bit w x h PNG of zeros (about 50 kB; PIL would need 400 MB to decode it)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = zlib.compress(b"\x00" * (h * (1 + (w + 7) // 8)), 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + \
        chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl")
    save_vl(tiny_vl(vocab=320, image_id=310, context=1024), path)
    Tokenizer.train(["a red square", "how many circles", "what colour"] * 5, vocab_size=300).save_pretrained(path)
    engine = Engine.from_pretrained(str(path))
    sched = Scheduler(engine, max_batch=8, queue_size=16).start()
    uv, thread, port = serve_in_thread(create_app(sched, "vl"))
    yield engine, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
    uv.should_exit = True
    thread.join(timeout=10)
    sched.stop()


def ask(client, parts, max_tokens=5):
    return client.chat.completions.create(model="vl", max_tokens=max_tokens, temperature=0,
                                          messages=[{"role": "user", "content": parts}])


def test_an_image_gets_the_engines_answer(vl_server):
    engine, client = vl_server
    img = picture(7)
    r = ask(client, [{"type": "image_url", "image_url": {"url": data_url(png(img))}},
                     {"type": "text", "text": "what colour"}])
    tok = engine.tokenizer
    ids, _ = chat_prompt(tok, [{"role": "user", "content": [engine.image_slots(), "what colour"]}])
    want = engine.generate([ids], 5, images=[[img]])[0].tokens
    m = r.choices[0].message  # the built-in template opens <think>: a tiny random model's reply is reasoning
    assert (getattr(m, "reasoning_content", "") or "") + m.content == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("url, says", [
    (data_url(png(picture(1))[:200]), "truncated or corrupt"),
    (data_url(huge_png()), "over the limit"),
    (data_url(png(picture(1)), "image/svg+xml"), "MIME type image/svg+xml is not an accepted"),
    (data_url(png(picture(1)), "image/jpeg"), "declared image/jpeg but the data is image/png"),
    ("https://example.com/cat.png", "remote image URLs are refused"),
    ("data:image/png;base64,@@@", "not valid base64"),
])
def test_bad_images_are_400s_that_name_the_problem_and_harm_no_other_request(vl_server, url, says):
    engine, client = vl_server
    good = {}
    t = threading.Thread(target=lambda: good.setdefault("r", ask(client, [
        {"type": "image_url", "image_url": {"url": data_url(png(picture(2)))}}, {"type": "text", "text": "hi"}])))
    t.start()
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what colour"}])
    t.join()
    assert says in str(e.value) and "messages.0.content.0" in str(e.value)
    assert good["r"].choices[0].finish_reason in ("stop", "length")


def test_image_count_limit(vl_server):
    _, client = vl_server
    part = {"type": "image_url", "image_url": {"url": data_url(png(picture(3)))}}
    with pytest.raises(openai.BadRequestError, match="more than 4 images"):
        ask(client, [part] * 5)


def test_the_web_page_attaches_an_image(vl_server, tmp_path):
    """Headless Chromium: choose a file, send a message, the reply streams (skipped without Chromium)."""
    import os
    import shutil
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.path.exists(p)), None)
    if chromium is None:
        pytest.skip("no chromium binary")
    engine, client = vl_server
    picture(4).save(tmp_path / "shape.png")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(str(client.base_url).removesuffix("/v1/") + "/")
            assert page.locator("#attach").is_visible()
            page.set_input_files("#image", str(tmp_path / "shape.png"))
            page.fill("#input", "what colour")
            page.click("#send")
            reply = page.locator(".msg.assistant").nth(0)
            sync_api.expect(reply.locator(".stats")).to_contain_text("tokens in", timeout=60_000)
            assert "Error" not in reply.locator(".answer").inner_text()
            assert page.locator(".msg.user img").count() == 1
        finally:
            browser.close()
