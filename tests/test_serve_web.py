"""The web chat page, driven in headless Chromium with Playwright: type, send, watch the reply stream.

Uses the system Chromium (`make browser` installs Debian's); skipped when there is none. The
screenshot goes to the test's tmp_path and, when NANOSEEK_SCREENSHOT is set, to that path too.
NANOSEEK_WEB_MODEL=PATH serves a real checkpoint instead of the random tiny one (for docs).
"""

import os
import shutil

import pytest
import torch
from conftest import randomize_

sync_api = pytest.importorskip("playwright.sync_api")

from nanoseek.hf import save_pretrained  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.inference import Engine  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.serve.api import create_app, serve_in_thread  # noqa: E402
from nanoseek.inference.scheduler import Scheduler  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium, "
                                                          "or `make browser`)")
KEY = "sk-web-test"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    path = os.environ.get("NANOSEEK_WEB_MODEL")
    if not path:
        path = tmp_path_factory.mktemp("ckpt")
        torch.manual_seed(0)
        cfg = ModelConfig.preset("tiny").replace(max_position_embeddings=1024)
        save_pretrained(randomize_(Transformer(cfg), scale=0.1), path)
        Tokenizer.train(["12+30=42", "the answer is 42", "think first"] * 20, vocab_size=300).save_pretrained(path)
    sched = Scheduler(Engine.from_pretrained(str(path)), max_batch=4).start()
    server, thread, port = serve_in_thread(create_app(sched, "tiny", api_key=KEY))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sched.stop()


def test_type_send_and_see_the_streamed_reply(base_url, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(base_url + "/")
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            for turn, text in enumerate(["What is 12 + 30?", "What is 47 * 6?"]):
                page.fill("#input", text)
                page.click("#send")
                reply = page.locator(".msg.assistant").nth(turn)
                # the stats line is written when the stream has ended; text arrived before it
                sync_api.expect(reply.locator(".stats")).to_contain_text("tokens in", timeout=60_000)
                streamed = reply.locator(".reasoning").inner_text() + reply.locator(".answer").inner_text()
                assert streamed.strip(), "no streamed text"
                assert "Error" not in reply.locator(".answer").inner_text()
            assert page.locator(".msg.user").count() == 2
            assert page.locator(".msg.assistant details").count() == 2  # collapsible reasoning per reply
            assert page.evaluate("localStorage.getItem('nanoseek-api-key')") == KEY
            shot = tmp_path / "web_chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            if os.environ.get("NANOSEEK_SCREENSHOT"):
                page.screenshot(path=os.environ["NANOSEEK_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
