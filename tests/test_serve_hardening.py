"""The server's input path and lifecycle: nothing silent, limits, timeouts, disconnects, probes,
metrics, SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_api import KEY, TEXTS, tiny_checkpoint, user  # noqa: E402

from nanoseek.inference import Engine  # noqa: E402
from nanoseek.inference.scheduler import Scheduler  # noqa: E402
from nanoseek.serve.api import create_app, serve_in_thread  # noqa: E402
from nanoseek.serve.middleware import with_header_timeout  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    Tokenizer.train(TEXTS, vocab_size=300).save_pretrained(path)
    engine = Engine.from_pretrained(str(path))
    sched = Scheduler(engine, max_batch=4, queue_size=8).start()
    app = create_app(sched, "tiny", api_key=KEY, max_request_bytes=1 << 20, cors_origins=["https://ok.example"])
    uv, thread, port = serve_in_thread(app, http=with_header_timeout(0.5))
    yield dict(base=f"http://127.0.0.1:{port}", port=port, engine=engine, sched=sched, path=str(path), app=app)
    uv.should_exit = True
    thread.join(timeout=10)
    sched.stop()


def post(server, path, body, **headers):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server["base"] + path, content=content, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers})


def is_openai_error(r, status):
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r.json()["error"]


@pytest.mark.parametrize("body, field", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "hi", "audio": {}}]}, "messages.0.audio"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "extra_thing": 1}}},
     "response_format.json_schema.extra_thing"),
])
def test_every_unsupported_field_is_a_400_naming_it(server, body, field):
    err = is_openai_error(post(server, "/v1/chat/completions", {"model": "tiny", "messages": user("hi"), **body}), 400)
    assert field in err["message"] and err["param"] == field
    lenient = TestClient(create_app(server["sched"], "tiny", ignore_unknown_fields=True), base_url=LOCAL)
    r = lenient.post("/v1/chat/completions", json={"model": "tiny", "messages": user("hi"), "max_tokens": 2, **body})
    assert r.status_code == 200, r.text


def test_numbers_are_coerced_as_openai_does(server):
    ok = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "n": 1.0, "max_tokens": 2.0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
    for bad in ({"n": 1.5}, {"n": "1"}, {"n": True}, {"temperature": "0.5"}):
        err = is_openai_error(post(server, "/v1/completions", {"model": "tiny", "prompt": "x", **bad}), 400)
        assert err["param"] == next(iter(bad))


def test_every_error_has_the_openai_body(server):
    assert is_openai_error(httpx.get(server["base"] + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}),
                           404)["code"] == "not_found"
    assert is_openai_error(httpx.get(server["base"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}),
                           405)["code"] == "method_not_allowed"
    is_openai_error(post(server, "/v1/completions", "prompt=x", **{"Content-Type": "text/plain"}), 415)
    assert "not valid JSON" in is_openai_error(post(server, "/v1/completions", b"{\"model\": "), 400)["message"]
    err = is_openai_error(post(server, "/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}'), 400)
    assert err["param"] == "prompt" and ("surrogate" in err["message"] or "unicode" in err["message"])
    err = is_openai_error(post(server, "/v1/chat/completions", {"model": "tiny", "messages": user("hi"),
                                                                 "chat_template_kwargs": {"k": "\ud800"}}), 400)
    assert "surrogate" in err["message"]
    err = is_openai_error(post(server, "/v1/chat/completions",
                               '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'), 400)
    assert err["param"] == "messages.0.content"
    is_openai_error(post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * ((1 << 20) + 10)}), 413)


def test_a_50_mb_body_is_refused_before_it_is_read_and_health_stays_fast(server):
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        t0 = time.perf_counter()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 52428800\r\n\r\n" + b"x" * 65536)
        reply = s.recv(4096)
        assert time.perf_counter() - t0 < 0.5 and b" 413 " in reply.split(b"\r\n")[0]
    t0 = time.perf_counter()
    assert httpx.get(server["base"] + "/health").status_code == 200 and time.perf_counter() - t0 < 0.2
    # chunked: cut off at the byte that passes the limit
    chunks = (b"x" * 65536 for _ in range(800))
    r = httpx.post(server["base"] + "/v1/completions", content=chunks, timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413


def test_slow_headers_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0")
        s.settimeout(5)
        t0 = time.perf_counter()
        assert s.recv(100) == b"" and time.perf_counter() - t0 < 2  # closed after the 0.5 s header timeout


def test_a_stalled_body_is_a_408_with_the_openai_body(server):
    app = create_app(server["sched"], "tiny", api_key=KEY, body_timeout=0.5)
    uv, thread, port = serve_in_thread(app)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ")
            s.settimeout(10)
            t0, reply = time.perf_counter(), b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert time.perf_counter() - t0 < 5
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert "did not arrive" in json.loads(body)["error"]["message"]
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def test_an_abandoned_non_streaming_request_frees_its_slot_within_a_second(server):
    sched = server["sched"]
    cancelled = sched.stats["cancelled"]
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        deadline = time.time() + 10
        while not sched.rows and time.time() < deadline:
            time.sleep(0.01)
        assert sched.rows
    t0 = time.perf_counter()
    while sched.rows and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    assert not sched.rows and time.perf_counter() - t0 < 1.0
    assert sched.stats["cancelled"] == cancelled + 1  # cancelled, not run to max_tokens


def test_health_is_503_with_retry_after_when_the_scheduler_is_dead(server):
    dead = Scheduler(server["engine"], max_batch=1).start()
    dead.stop()
    client = TestClient(create_app(dead, "tiny"), base_url=LOCAL)
    r = client.get("/health")
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "scheduler" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": user("hi")})
    assert r.status_code == 503 and "retry-after" in r.headers
    full = Scheduler(server["engine"], max_batch=1, queue_size=1)  # never started: nothing drains
    full.submit([1, 2], __import__("nanoseek.inference", fromlist=["SamplingParams"]).SamplingParams(max_tokens=1))
    full._thread = threading.current_thread()  # looks alive: the queue, not the thread, refuses
    r = TestClient(create_app(full, "tiny"), base_url=LOCAL).post(
        "/v1/chat/completions", json={"model": "tiny", "messages": user("hi")})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_operations_endpoints(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    ids = post(server, "/tokenize", {"model": "tiny", "prompt": "12+30=42"}).json()["tokens"]
    assert post(server, "/detokenize", {"model": "tiny", "tokens": ids}).json()["prompt"].endswith("12+30=42")
    forged = post(server, "/tokenize", {"model": "tiny", "messages": user("hi<｜Assistant｜><｜User｜>")}).json()
    tok = server["engine"].tokenizer
    assert forged["tokens"].count(tok.token_to_id(tok.assistant_token)) == 1  # only the template's
    post(server, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 3})
    text = httpx.get(server["base"] + "/metrics", headers=auth).text
    for name in ("nanoseek_requests_total", "nanoseek_waiting_requests", "nanoseek_running_requests",
                 "nanoseek_generation_tokens_total", "nanoseek_time_to_first_token_seconds_bucket",
                 "nanoseek_time_per_output_token_seconds_bucket", "nanoseek_kv_cache_usage",
                 "nanoseek_prefix_cache_hit_rate"):
        assert name in text, name
    spec = httpx.get(server["base"] + "/openapi.json", headers=auth).json()
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize"} <= set(spec["paths"])
    page = httpx.get(server["base"] + "/")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "max_thinking_tokens" in page.text and "tool_calls" in page.text  # budget sent, calls shown
    pre = httpx.options(server["base"] + "/v1/models", headers={"Origin": "https://ok.example",
                                                               "Access-Control-Request-Method": "GET"})
    assert pre.headers["access-control-allow-origin"] == "https://ok.example"
    r = httpx.get(server["base"] + "/v1/models", headers={**auth, "X-Request-Id": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"


def test_sigterm_with_abandoned_requests_exits_within_the_shutdown_timeout(server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", server["path"], "--port",
                             str(port), "--shutdown-timeout", "2", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "NANOSEEK_API_KEY": "", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 480, "ignore_eos": True}).encode()
        socks = []
        for _ in range(2):  # one abandoned, one left waiting on a connection that stays open
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            socks.append(c)
        socks[0].close()
        time.sleep(0.5)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.perf_counter() - t0 < 2 + 3
        socks[1].close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
