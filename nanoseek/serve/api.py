"""The OpenAI-compatible HTTP API over a ``Scheduler``: FastAPI app and SSE streaming (the request
models and error body are in protocol.py).

    app = create_app(scheduler, model_name="my-model", api_key="sk-...")
    server, thread = serve_in_thread(app, "127.0.0.1", 8000)    # tests and benchmarks
    ...; server.should_exit = True; thread.join()

Endpoints: POST /v1/chat/completions, POST /v1/completions (fill-in-the-middle with `suffix`),
GET /v1/models, GET /health, and the web chat page at /. Errors have OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` and a 4xx code for anything the client got
wrong (malformed JSON and validation errors answer 400, not FastAPI's 422); a full queue is 429.
Chat replies carry `reasoning_content` apart from `content` (chat.ReasoningSplitter), in whole responses
and in streamed deltas. Nothing of a prompt or completion is logged unless log_requests is set.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import threading
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse

from ..chat import ReasoningSplitter, chat_prompt
from ..inference import SamplingParams
from ..inference.scheduler import NotRunning, QueueFull
from ..tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE
from .protocol import (APIError, ChatRequest, CompletionRequest, RequestBase, error_response,
                       validation_message)

log = logging.getLogger("nanoseek.serve")

PUBLIC = {"/", "/health"}  # everything else needs the key when there is one


def _loopback_only(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _addressed_to_loopback(host_header: str) -> bool:
    """True when a request's Host header names this machine (localhost, 127.x, [::1], any port)."""
    from urllib.parse import urlsplit
    try:
        name = urlsplit("//" + host_header).hostname
    except ValueError:
        return False
    return bool(name) and (name == "localhost" or name.endswith(".localhost") or _loopback_only(name))


def check_listen(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not api_key and not _loopback_only(host):
        raise ValueError(f"--host {host} listens beyond this machine: set --api-key or NANOSEEK_API_KEY "
                         "(or listen on 127.0.0.1)")


def create_app(scheduler, model_name: str, api_key: str | None = None, log_requests: bool = False) -> FastAPI:
    """The FastAPI app serving `scheduler`'s model under the id `model_name`.

    Long by design: the routes are closures over the scheduler, tokenizer and key, defined in the
    order a request meets them (auth middleware, pages, validation helpers, the shared SSE runner,
    then the two endpoints), so one read shows the whole request path."""
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    tok = scheduler.tokenizer
    created = int(time.time())
    page = resources.files("nanoseek.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        # A keyless server listens on loopback only, but a web page the user visits can still reach
        # it by pointing its own name at 127.0.0.1 (DNS rebinding): answer only requests addressed
        # to this machine by name.
        if not api_key and not _addressed_to_loopback(request.headers.get("host", "")):
            return error_response(403, f"Host {request.headers.get('host', '')!r} is not this machine: a server "
                                       "without an API key answers only requests addressed to localhost or "
                                       "127.0.0.1 (set --api-key to serve other names)", code="host_not_allowed")
        if api_key and request.url.path not in PUBLIC:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      code="invalid_api_key")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page.replace("__MODEL__", html.escape(model_name)).replace(
            "__NEEDS_KEY__", "true" if api_key else "false"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(scheduler.rows), "waiting": scheduler.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanoseek"}]}

    def check_model(body: RequestBase) -> None:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def max_tokens_for(prompt: list[int], wanted: int | None) -> int:
        room = scheduler.context - len(prompt)
        if room < 1 or (wanted is not None and wanted > room):
            raise APIError(400, f"this model's context is {scheduler.context} tokens; the prompt has "
                           f"{len(prompt)} and max_tokens={wanted} would need {len(prompt) + (wanted or 1)}",
                           param="messages", code="context_length_exceeded")
        return wanted or room

    def params(body: RequestBase, max_tokens: int, i: int) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = None if body.seed is None else body.seed + i  # n choices differ but stay reproducible
        top_k = body.top_k if body.top_k and body.top_k > 0 else None
        return SamplingParams(max_tokens, body.temperature, top_k, body.top_p, seed, stop, ignore_eos=body.ignore_eos)

    def submit(jobs: list[tuple[list[int], SamplingParams]], events: asyncio.Queue) -> list:
        """Queue every choice; all or nothing. Events arrive as (choice index, Event)."""
        if len(jobs) > scheduler.incoming.maxsize:  # could never be queued at once: not worth a retry
            raise APIError(400, f"{len(jobs)} choices (prompts x n) exceed the server's queue of "
                           f"{scheduler.incoming.maxsize}", param="n")
        loop = asyncio.get_running_loop()
        reqs = []
        try:
            for i, (ids, p) in enumerate(jobs):
                reqs.append(scheduler.submit(ids, p, lambda ev, i=i: loop.call_soon_threadsafe(
                    events.put_nowait, (i, ev))))
        except (QueueFull, NotRunning, ValueError) as e:
            for r in reqs:
                r.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                               code="queue_full") from None
            if isinstance(e, NotRunning):
                raise APIError(503, str(e), type="server_error", code="unavailable") from None
            raise APIError(400, str(e)) from None
        return reqs

    async def next_event(request: Request, events: asyncio.Queue):
        """The next (index, Event), or None once the client has gone away."""
        if not events.empty():  # the common case while streaming: no timer needed
            return events.get_nowait()
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    def usage(finals: dict, prompt_lengths: list[int], choice_prompt: list[int]) -> dict:
        cached = [min(finals[i].cached_tokens for i in finals if choice_prompt[i] == p)
                  for p in range(len(prompt_lengths))]
        completion = sum(ev.completion_tokens for ev in finals.values())
        return {"prompt_tokens": sum(prompt_lengths), "completion_tokens": completion,
                "total_tokens": sum(prompt_lengths) + completion,
                "prompt_tokens_details": {"cached_tokens": sum(cached)}}

    async def run(request: Request, kind: str, jobs, choice_prompt, prompt_lengths, stream: bool,
                  include_usage: bool, inside: bool, echo: list[str] | None = None):
        """Submit the choices and answer with one JSON body or an SSE stream.

        Long because the whole answer and the streamed one are written side by side over the same
        submitted requests, id, texts and usage, so the two shapes can be compared line by line."""
        events: asyncio.Queue = asyncio.Queue()
        reqs = submit(jobs, events)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if kind == "chat" else "text_completion"
        t0 = time.perf_counter()

        def done_log(finals):
            if log_requests:
                log.info("%s %s: prompts %r -> %r (%.2fs)", rid, kind, [tok.decode(ids) for ids, _ in jobs],
                         [texts[i] for i in range(len(jobs))], time.perf_counter() - t0)

        texts = {i: (echo[choice_prompt[i]] if echo else "") for i in range(len(jobs))}
        finals: dict = {}
        if not stream:
            try:
                while len(finals) < len(jobs):
                    got = await next_event(request, events)
                    if got is None:
                        return error_response(499, "client disconnected")
                    i, ev = got
                    texts[i] += ev.text
                    if ev.finish_reason is not None:
                        if ev.finish_reason == "error":
                            raise APIError(500, ev.error or "generation failed", type="server_error")
                        finals[i] = ev
            finally:
                for r in reqs:
                    r.cancel()
            done_log(finals)
            choices = []
            for i in range(len(jobs)):
                reason = "length" if finals[i].finish_reason == "length" else "stop"
                if kind == "chat":
                    s = ReasoningSplitter(inside)
                    (r1, c1), (r2, c2) = s.feed(texts[i]), s.flush()
                    msg = {"role": "assistant", "content": c1 + c2, "reasoning_content": (r1 + r2) or None}
                    choices.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": None})
                else:
                    choices.append({"index": i, "text": texts[i], "finish_reason": reason, "logprobs": None})
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": choices, "usage": usage(finals, prompt_lengths, choice_prompt)}

        async def sse():
            obj_chunk = "chat.completion.chunk" if kind == "chat" else "text_completion"
            splitters = [ReasoningSplitter(inside) for _ in jobs]

            def chunk(choices, extra=None):
                body = {"id": rid, "object": obj_chunk, "created": int(time.time()), "model": model_name,
                        "choices": choices, **(extra or {})}
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

            def delta(i, text, finish=None, first=False):
                if kind != "chat":
                    return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                d = {"role": "assistant", "content": ""} if first else {}
                r, c = splitters[i].feed(text)
                if finish is not None:
                    r2, c2 = splitters[i].flush()
                    r, c = r + r2, c + c2
                if r:
                    d["reasoning_content"] = r
                if c:
                    d["content"] = c
                return {"index": i, "delta": d, "finish_reason": finish, "logprobs": None}

            try:
                if kind == "chat":
                    yield chunk([delta(i, "", first=True) for i in range(len(jobs))])
                elif echo:
                    yield chunk([delta(i, texts[i]) for i in range(len(jobs))])
                while len(finals) < len(jobs):
                    got = await next_event(request, events)
                    if got is None:
                        return
                    i, ev = got
                    texts[i] += ev.text
                    if ev.finish_reason == "error":
                        err = {"message": ev.error or "generation failed", "type": "server_error",
                               "param": None, "code": None}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        return
                    finish = None
                    if ev.finish_reason is not None:
                        finals[i] = ev
                        finish = "length" if ev.finish_reason == "length" else "stop"
                    d = delta(i, ev.text, finish)
                    if finish is not None or d.get("text") or len(d.get("delta", {})) > 0:
                        yield chunk([d])
                done_log(finals)
                if include_usage:
                    yield chunk([], {"usage": usage(finals, prompt_lengths, choice_prompt)})
                yield "data: [DONE]\n\n"
            finally:  # finished, failed or the client went away: free the slots
                for r in reqs:
                    r.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body)
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.reasoning_content is not None:
                msg["reasoning_content"] = m.reasoning_content
            messages.append(msg)
        try:
            ids, inside = chat_prompt(tok, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = max_tokens_for(ids, body.max_completion_tokens or body.max_tokens)
        jobs = [(ids, params(body, max_tokens, i)) for i in range(body.n)]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, "chat", jobs, [0] * body.n, [len(ids)], body.stream, include_usage, inside)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        bos = tok.bos_token if tok.bos_id is not None else ""
        if body.suffix is not None:  # fill in the middle: PSM layout, the model writes the middle
            if body.echo:
                raise APIError(400, "echo cannot be combined with suffix", param="echo")
            texts = [f"{bos}{FIM_BEGIN}{p}{FIM_HOLE}{body.suffix}{FIM_END}" for p in prompts]
        else:
            texts = [bos + p for p in prompts]
        encoded = [tok.encode(t) for t in texts]
        if any(not ids for ids in encoded):
            raise APIError(400, "the prompt is empty and the tokenizer has no BOS token to start from",
                           param="prompt")
        jobs, choice_prompt = [], []
        for p, ids in enumerate(encoded):
            max_tokens = max_tokens_for(ids, body.max_tokens)
            for j in range(body.n):
                jobs.append((ids, params(body, max_tokens, j)))
                choice_prompt.append(p)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, "text", jobs, choice_prompt, [len(ids) for ids in encoded], body.stream,
                         include_usage, inside=False, echo=prompts if body.echo else None)

    return app


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, **kw):
    """Run uvicorn in a background thread; returns (server, thread, port) once it listens."""
    import socket

    import uvicorn
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", **kw))
    thread = threading.Thread(target=server.run, name="nanoseek-uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, port
