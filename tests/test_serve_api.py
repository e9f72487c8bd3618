"""The OpenAI-compatible server: a real uvicorn on loopback driven with the official `openai` client."""

import asyncio
import json
import time

import pytest
import torch
from conftest import randomize_

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from nanoseek import cli  # noqa: E402
from nanoseek.hf import save_pretrained  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.chat import chat_prompt  # noqa: E402
from nanoseek.inference import Engine  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.serve.api import check_listen, create_app, serve_in_thread  # noqa: E402
from nanoseek.inference import SamplingParams  # noqa: E402
from nanoseek.inference.scheduler import Scheduler  # noqa: E402
from nanoseek.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer  # noqa: E402

KEY = "sk-test-key"
TEXTS = ["12+30=42", "7*6=42", "the answer is 42", "think first, then answer", "def f(x): return x"] * 20


def tiny_checkpoint(path, max_len=512):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(max_position_embeddings=max_len)
    save_pretrained(randomize_(Transformer(cfg), scale=0.1), path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    Tokenizer.train(TEXTS, vocab_size=300).save_pretrained(path)
    engine = Engine.from_pretrained(str(path))
    sched = Scheduler(engine, max_batch=32, queue_size=64).start()
    app = create_app(sched, "tiny", api_key=KEY)
    uv, thread, port = serve_in_thread(app)
    base = f"http://127.0.0.1:{port}"
    yield dict(base=base, engine=engine, sched=sched, path=str(path),
               client=openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60))
    uv.should_exit = True
    thread.join(timeout=10)
    sched.stop()


def post(server, path, body, key=KEY):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server["base"] + path, content=content, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def user(text):
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- endpoints

def test_models_and_health(server):
    assert [m.id for m in server["client"].models.list().data] == ["tiny"]
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"


def test_chat_whole_and_streamed_agree_and_split_reasoning(server):
    client, engine = server["client"], server["engine"]
    tok = engine.tokenizer
    messages = user("What is 12+30?")
    resp = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24)
    msg = resp.choices[0].message
    want = tok.decode(engine.generate([chat_prompt(tok, messages)[0]], 24)[0].tokens)
    assert ((msg.reasoning_content or ""), msg.content) == tok.split_reasoning(want)
    assert resp.usage.prompt_tokens == len(chat_prompt(tok, messages)[0])
    assert resp.usage.completion_tokens == 24 and resp.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    reasoning = content = ""
    usage, finish = None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content) == ((msg.reasoning_content or ""), msg.content)
    assert finish == "length" and usage.completion_tokens == 24
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its blocks were cached


def test_mtp_speculative_server_streams_plain_greedy_and_top_k_filters(server, capsys):
    """`nanoseek serve --speculative mtp`: streamed and whole completions equal Engine.generate's plain
    greedy tokens and `nanoseek generate`'s (plain and MTP); top_k=1 samples the argmax."""
    engine = server["engine"]
    tok = engine.tokenizer
    sched = Scheduler(engine, max_batch=4, speculative="mtp").start()
    uv, thread, port = serve_in_thread(create_app(sched, "tiny", api_key=KEY))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        for prompt in ("12+30=", "the answer"):
            want = tok.decode(engine.generate([tok.encode(prompt, add_bos=True)], 12)[0].tokens)
            kw = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
            assert streamed == client.completions.create(**kw).choices[0].text == want
            for extra in (["--speculative", "off"], [], ["--speculative", "mtp"]):  # [] = auto: mtp here
                argv = ["generate", "--model", server["path"], "--prompt", prompt, "--max-new-tokens", "12"]
                assert cli.main(argv + extra) == 0 and capsys.readouterr().out == prompt + want + "\n"
        assert sched.stats["drafted"] > 0 and sched.stats["accepted"] >= 0
        top1 = client.completions.create(model="tiny", prompt="7*6=", max_tokens=8, temperature=1.0,
                                         extra_body={"top_k": 1})
        assert top1.choices[0].text == tok.decode(engine.generate([tok.encode("7*6=", add_bos=True)], 8)[0].tokens)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sched.stop()


def test_completions_plain_fim_echo_stop_and_n(server):
    client, engine = server["client"], server["engine"]
    tok = engine.tokenizer
    resp = client.completions.create(model="tiny", prompt="12+30=", max_tokens=10, temperature=0)
    ids = tok.encode("12+30=", add_bos=True)
    assert resp.choices[0].text == tok.decode(engine.generate([ids], 10)[0].tokens)
    fim = client.completions.create(model="tiny", prompt="def f(x):", suffix="\nprint(f(2))", max_tokens=8,
                                    temperature=0)
    fim_ids = tok.encode(f"{tok.bos_token}{FIM_BEGIN}def f(x):{FIM_HOLE}\nprint(f(2)){FIM_END}")
    assert fim.usage.prompt_tokens == len(fim_ids)
    assert fim.choices[0].text == tok.decode(engine.generate([fim_ids], 8)[0].tokens)
    echo = client.completions.create(model="tiny", prompt="7*6=", max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("7*6=")
    full = resp.choices[0].text
    if len(full) > 3:
        stopped = client.completions.create(model="tiny", prompt="12+30=", max_tokens=10, temperature=0,
                                            stop=[full[2:4]])
        assert stopped.choices[0].text == full[:full.find(full[2:4])]
        assert stopped.choices[0].finish_reason == "stop"
    many = client.completions.create(model="tiny", prompt="the", max_tokens=6, temperature=1.0, seed=3, n=3)
    again = client.completions.create(model="tiny", prompt="the", max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded: reproducible


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(server["base"] + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1", "/docs", "/openapi.json"):
        r = post(server, path, {"model": "tiny", "messages": user("hi"), "prompt": "x"}, key="wrong")
        assert r.status_code == 401, path  # every route but the page and /health, even unknown ones
    assert httpx.get(server["base"] + "/").status_code == 200  # the page itself asks for the key


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": user("hi"), "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": user("hi"), "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": user("hi"), "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": user("hi")}, 404, "does not exist"),
    ("/v1/chat/completions", {"model": "tiny", "messages": user("hi " * 600)}, 400, "context"),
    ("/v1/chat/completions", {"model": "tiny", "messages": user("hi"), "max_tokens": 10_000}, 400, "context"),
    ("/v1/chat/completions", {"model": "tiny", "messages": user("hi"), "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": user("hi"), "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a"] * 5}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a" * 1001]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": ["x"] * 16, "n": 16}, 400, "queue"),
])
def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server, path, body, status, needle):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    ok = server["client"].chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_a_request_that_fails_to_sample_is_a_500_and_others_go_on(server, monkeypatch):
    from test_inference_scheduler import POISON, fail_to_sample
    fail_to_sample(monkeypatch)
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 4, "temperature": POISON})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    ok = server["client"].completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason == "length" and server["sched"].alive


def test_32_concurrent_streams_equal_sequential_greedy(server):
    prompts = [f"{i}+{2 * i}=" for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(p):
        text = ""
        stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0,
                                                  stream=True)
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    async def all_at_once():
        async with aclient:
            return await asyncio.gather(*(one(p) for p in prompts))

    steps0, rows0 = server["sched"].stats["steps"], server["sched"].stats["rows_decoded"]
    together = asyncio.run(all_at_once())
    shared = (server["sched"].stats["rows_decoded"] - rows0) / (server["sched"].stats["steps"] - steps0)
    alone = [server["client"].completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
             .choices[0].text for p in prompts]
    assert together == alone
    assert shared > 4  # rows per decode step: the streams really were batched


def test_a_client_that_disconnects_frees_its_slot(server):
    cancelled = server["sched"].stats["cancelled"]
    with httpx.stream("POST", server["base"] + "/v1/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "the", "max_tokens": 480, "stream": True,
                            "temperature": 0}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 10
    while time.time() < deadline and server["sched"].rows:
        time.sleep(0.05)
    assert server["sched"].rows == [] and server["sched"].stats["cancelled"] == cancelled + 1


def test_repeated_system_prompt_is_served_from_the_prefix_cache(server):
    system = [{"role": "system", "content": "You are a careful calculator. " * 8}]
    first = server["client"].chat.completions.create(model="tiny", messages=system + user("1+1?"), max_tokens=2)
    second = server["client"].chat.completions.create(model="tiny", messages=system + user("2+2?"), max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens < 16
    assert second.usage.prompt_tokens_details.cached_tokens >= 32


# ----------------------------------------------------------------------------- in-process apps

LOCAL = "http://127.0.0.1:8000"  # TestClient's default Host, "testserver", is refused by a keyless app


def test_a_keyless_server_answers_only_requests_addressed_to_this_machine(server):
    """DNS rebinding: a page on evil.example resolving its name to 127.0.0.1 must not reach the API."""
    app = create_app(server["sched"], "tiny")
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        r = TestClient(app, base_url="http://x").get("/v1/models", headers={"host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "127.0.0.2"):
        assert TestClient(app, base_url="http://x").get("/v1/models", headers={"host": host}).status_code == 200
    # with a key the Host header does not matter: the key is what an attacker's page lacks
    keyed = TestClient(create_app(server["sched"], "tiny", api_key=KEY), base_url="http://evil.example")
    assert keyed.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_queue_full_is_429_and_a_dead_scheduler_503(server):
    sched = Scheduler(server["engine"], max_batch=1, queue_size=1)  # never started: nothing drains
    sched.submit([1, 2], SamplingParams(max_tokens=1))
    client = TestClient(create_app(sched, "tiny"), base_url=LOCAL)
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": user("hi")})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    dead = Scheduler(server["engine"], max_batch=1).start()
    dead.stop()
    r = TestClient(create_app(dead, "tiny"), base_url=LOCAL).post("/v1/chat/completions",
                                                  json={"model": "tiny", "messages": user("hi")})
    assert r.status_code == 503


def test_bare_tokenizer_json_serves_with_the_builtin_template(tmp_path):
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tiny_checkpoint(tmp_path, max_len=256)
    tok.save(str(tmp_path / "tokenizer.json"))
    engine = Engine.from_pretrained(str(tmp_path))
    assert engine.tokenizer.bos_id is None and engine.tokenizer.eos_id is None
    sched = Scheduler(engine, max_batch=2).start()
    try:
        client = TestClient(create_app(sched, "bare"), base_url=LOCAL)
        r = client.post("/v1/chat/completions", json={"model": "bare", "messages": user("hi"), "max_tokens": 5,
                                                        "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(engine.tokenizer.encode_chat(user("hi"), True)[0])
    finally:
        sched.stop()


def test_serve_refuses_a_public_host_without_a_key(capsys, monkeypatch):
    monkeypatch.delenv("NANOSEEK_API_KEY", raising=False)
    with pytest.raises(ValueError, match="api-key"):
        check_listen("0.0.0.0", None)
    check_listen("0.0.0.0", "k")
    check_listen("127.0.0.1", None)
    check_listen("::1", None)
    assert cli.main(["serve", "--model", "/nonexistent", "--host", "0.0.0.0"]) == 2
    assert "NANOSEEK_API_KEY" in capsys.readouterr().err
