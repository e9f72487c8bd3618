"""What every HTTP request passes through before a route: a request id and a JSON log line, the
body limit and body read timeout, and uvicorn's protocol with a header read timeout.

    app.add_middleware(Guard, max_bytes=4 << 20, body_timeout=30, log=log, on_done=metrics.count)
    uvicorn.Config(app, http=with_header_timeout(10))

``Guard`` is plain ASGI (not Starlette's BaseHTTPMiddleware) so that it sees the body as it
arrives: a Content-Length over the limit is a 413 before any of the body is read, a chunked body
is cut off (413) at the byte that passes the limit, and a body that stalls for `body_timeout`
seconds is a 408. Log lines carry the request id (also the ``X-Request-Id`` response header),
method, path, status and duration, never a prompt.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from starlette.exceptions import HTTPException

from .protocol import error_body

_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodyTooLarge(HTTPException):
    """Raised by the body reader; an HTTPException so that FastAPI passes it on to the 413 handler."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the server's limit of {limit} bytes (--max-request-bytes)")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds}s")


async def _send_error(send, status: int, message: str, code: str, request_id: str) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", request_id.encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: request id, JSON log line, body size limit and body read timeout."""

    def __init__(self, app, max_bytes: int, body_timeout: float, log, on_done=None):
        self.app, self.max_bytes, self.body_timeout, self.log, self.on_done = app, max_bytes, body_timeout, log, on_done

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0, status = time.perf_counter(), [500]
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status[0] = 413
            await _send_error(send, 413, f"the request body is over the server's limit of {self.max_bytes} bytes "
                              "(--max-request-bytes)", "request_too_large", rid)
            return self._done(scope, rid, 413, t0)
        seen, body_done = [0], [False]

        async def limited_receive():
            if body_done[0]:  # after the body, receive() waits for a disconnect: no timeout then
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                body_done[0] = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as e:  # raised outside a route (the app answers them inside)
            status[0] = e.status_code
            await _send_error(send, e.status_code, e.detail, "request_too_large" if e.status_code == 413
                              else "request_timeout", rid)
        finally:
            self._done(scope, rid, status[0], t0)

    def _done(self, scope, rid: str, status: int, t0: float) -> None:
        ms = (time.perf_counter() - t0) * 1000
        self.log.info(json.dumps({"request_id": rid, "method": scope.get("method"), "path": scope.get("path"),
                                  "status": status, "ms": round(ms, 1)}))
        if self.on_done is not None:
            self.on_done(scope.get("path", ""), status)


def with_header_timeout(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than
    `seconds` (slowloris: a client trickling one header byte at a time holds a connection forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._timer = self.loop.call_later(seconds, self._too_slow)

        def data_received(self, data):
            super().data_received(data)
            if self._timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self._timer.cancel()  # the headers are in: a request is running
                self._timer = None

        def on_response_complete(self):
            super().on_response_complete()
            if self._timer is None:
                self._arm()

        def _too_slow(self):
            self._timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc):
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11
