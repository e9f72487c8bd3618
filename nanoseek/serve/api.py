"""The OpenAI-compatible HTTP API over a ``Scheduler``: the FastAPI app and its routes.

    app = create_app(scheduler, model_name="my-model", api_key="sk-...", max_request_bytes=4 << 20)
    server, thread, port = serve_in_thread(app, "127.0.0.1", 0)    # tests and benchmarks
    ...; server.should_exit = True; thread.join()

Endpoints: POST /v1/chat/completions (tools, response_format, logprobs, thinking budget),
POST /v1/completions (fill-in-the-middle with `suffix`, echo + logprobs, token-id prompts),
GET /v1/models, /health, /ready, /metrics (Prometheus), POST /tokenize, /detokenize,
/openapi.json and the web chat page at /. A request goes: Guard (middleware.py: request id,
body limit and timeout, log line) -> auth -> validation (protocol.py; unknown fields are a 400
naming them) -> prepare.py in a worker thread (template, tokens, grammar) -> respond.py (the
scheduler's events as one body or SSE). Every error, 404/405/413/415 and parse errors included,
has OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; 429 and 503 carry
Retry-After. Nothing of a prompt or completion is logged unless log_requests is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import threading
import time
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, StrictBool
from starlette.exceptions import HTTPException

from .metrics import Metrics
from .middleware import Guard
from .images import ImagePolicy
from .prepare import Context, prepare_chat, prepare_completion
from .protocol import (UNSUPPORTED, APIError, ChatRequest, CompletionRequest, Message, Model, Text, TokenId,
                       error_response, unknown_fields, validation_message)
from .respond import respond

log = logging.getLogger("nanoseek.serve")

PUBLIC = {"/", "/health", "/ready"}  # everything else needs the key when there is one
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


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


class Gate:
    """Plain ASGI middleware answering `check(request)`'s refusal instead of the app (plain so that
    the body reaches the app's reader untouched: its 413/408 errors must not be wrapped)."""

    def __init__(self, app, check):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.check(Request(scope))
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class TokenizeRequest(Model):
    model: Text(256) | None = None
    prompt: Text() | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=2048)] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(Model):
    model: Text(256) | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)


class Server:
    """What the routes share: the scheduler, options, metrics and the draining flag."""

    def __init__(self, scheduler, model_name: str, log_requests: bool, retry_after: int,
                 default_thinking_budget: int | None, allow_remote_images: bool = False):
        self.scheduler, self.tokenizer, self.model_name = scheduler, scheduler.tokenizer, model_name
        self.log_requests, self.retry_after = log_requests, retry_after
        self.metrics = Metrics(scheduler)
        self.draining = False  # set at shutdown: /health says 503 and new requests are refused
        self.ctx = Context(self.tokenizer, scheduler.context, scheduler.engine.eos_ids,
                           scheduler.engine.config.vocab_size, default_thinking_budget)
        if scheduler.engine.vision is not None:  # a DeepSeek-VL model: image_url parts accepted
            self.ctx.images = ImagePolicy(scheduler.engine, allow_remote=allow_remote_images)

    def health(self) -> str | None:
        """Why the server cannot take requests now, or None."""
        if self.draining:
            return "the server is shutting down"
        if not self.scheduler.alive:
            return "the scheduler is not running"
        return None

    def log_completion(self, rid: str, kind: str, job, texts: list[str], seconds: float) -> None:
        if self.log_requests:
            log.info(json.dumps({"request_id": rid, "kind": kind, "prompts": [self.tokenizer.decode(p) for p in job.prompts],
                                 "completions": texts, "s": round(seconds, 3)}, ensure_ascii=False))


def create_app(scheduler, model_name: str, api_key: str | None = None, log_requests: bool = False,
               max_request_bytes: int = 4 << 20, body_timeout: float = 30.0, ignore_unknown_fields: bool = False,
               cors_origins: list[str] | None = None, retry_after: int = 1,
               default_thinking_budget: int | None = None, allow_remote_images: bool = False) -> FastAPI:
    """The FastAPI app serving `scheduler`'s model under the id `model_name`.

    Long by design: the routes are closures over one ``Server``, defined in the order a request
    meets them (errors, auth, pages and probes, then the two generation endpoints)."""
    server = Server(scheduler, model_name, log_requests, retry_after, default_thinking_budget, allow_remote_images)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.draining = True  # shutting down (SIGTERM): /health is 503 and new requests are refused

    app = FastAPI(title="nanoseek", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    app.state.server = server
    tok = server.tokenizer
    created = int(time.time())
    page = resources.files("nanoseek.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        status = exc.status_code
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"
                   }.get(status, str(exc.detail))
        return error_response(status, message, "invalid_request_error" if status < 500 else "server_error",
                              code={404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                                    413: "request_too_large"}.get(status),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    def gate(request: Request):
        """The refusal for a request that may not reach a route (host, key, media type), or None."""
        # A keyless server listens on loopback only, but a web page the user visits can still reach
        # it by pointing its own name at 127.0.0.1 (DNS rebinding): answer only requests addressed
        # to this machine by name.
        if not api_key and not _addressed_to_loopback(request.headers.get("host", "")):
            return error_response(403, f"Host {request.headers.get('host', '')!r} is not this machine: a server "
                                       "without an API key answers only requests addressed to localhost or "
                                       "127.0.0.1 (set --api-key to serve other names)", code="host_not_allowed")
        if api_key and request.url.path not in PUBLIC and request.method != "OPTIONS":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      code="invalid_api_key")
        if request.method == "POST":
            ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if ctype != "application/json":
                return error_response(415, f"Content-Type {ctype!r}: this API takes application/json",
                                      code="unsupported_media_type")
        return None

    app.add_middleware(Gate, check=gate)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["authorization", "content-type", "x-request-id"])
    app.add_middleware(Guard, max_bytes=max_request_bytes, body_timeout=body_timeout, log=log,
                       on_done=server.metrics.count)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        vision = "true" if server.ctx.images is not None else "false"  # the page offers image attachments
        return HTMLResponse(page.replace("__MODEL__", html.escape(model_name)).replace(
            "__NEEDS_KEY__", "true" if api_key else "false").replace("__VISION__", vision),
            headers={"Content-Security-Policy": CSP})

    @app.get("/health")
    async def health():
        """200 when the scheduler runs and admits requests; 503 with the reason otherwise."""
        why = server.health()
        if why is not None:
            return error_response(503, why, "server_error", code="unavailable",
                                  headers={"Retry-After": str(retry_after)})
        return {"status": "ok", "running": len(scheduler.rows), "waiting": scheduler.waiting}

    @app.get("/ready")
    async def ready():
        """200 when a request would be admitted now without a 429 (a free place in the queue)."""
        why = server.health() or ("the queue is full" if scheduler.waiting >= scheduler.incoming.maxsize else None)
        if why is not None:
            return error_response(503, why, "server_error", code="unavailable", headers={"Retry-After": str(retry_after)})
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        data, ctype = server.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanoseek", "max_model_len": scheduler.context}]}

    def check(body) -> None:
        """The model exists and every field sent is one this server implements."""
        if getattr(body, "model", None) not in (None, model_name):
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        extra = unknown_fields(body) if isinstance(body, BaseModel) else []
        if extra and not ignore_unknown_fields:
            top = extra[0].split(".")[-1]
            why = "is not supported by this server" if top in UNSUPPORTED else "is not a field this server knows"
            raise APIError(400, f"{', '.join(extra)}: {why} (start the server with --ignore-unknown-fields to "
                           "ignore unknown fields)", param=extra[0], code="unsupported_field")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check(body)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.prompt is not None:
            bos = body.add_special_tokens and tok.bos_id is not None
            ids = await asyncio.to_thread(tok.encode, body.prompt, bos)
        else:
            chat = ChatRequest(model=model_name, messages=body.messages)
            ids = (await asyncio.to_thread(prepare_chat, server.ctx, chat)).prompts[0]
        return {"count": len(ids), "max_model_len": scheduler.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check(body)
        if any(t >= tok.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens: an id is outside the vocabulary of {tok.vocab_size}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check(body)
        job = await asyncio.to_thread(prepare_chat, server.ctx, body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(server, request, "chat", job, body.stream, include_usage)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        job = await asyncio.to_thread(prepare_completion, server.ctx, body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(server, request, "text", job, body.stream, include_usage)

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
