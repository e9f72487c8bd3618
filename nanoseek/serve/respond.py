"""Answering a prepared request: submit its runs to the scheduler, then one JSON body or an SSE
stream of chunks, with reasoning split out, tool calls parsed, log-probs and usage.

    return await respond(server, request, "chat", job, stream=False, include_usage=False)

A run's events arrive on the event loop as (run index, Event). A non-streaming client that goes
away is noticed within `DISCONNECT_POLL` seconds (the wait for the next event is bounded), and
every exit path cancels the runs, so the slots are freed. best_of > n: every run records its
log-probs, and the n with the highest total log-probability are returned.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..chat import ReasoningSplitter
from ..inference.scheduler import NotRunning, QueueFull
from .protocol import APIError, error_body, error_response
from .tools import ToolCallStream, parse_tool_calls

DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming client is still there


def submit(server, runs, events: asyncio.Queue, images=None) -> list:
    """Queue every run; all or nothing. Events arrive as (run index, Event)."""
    sched = server.scheduler
    if len(runs) > sched.incoming.maxsize:  # could never be queued at once: not worth a retry
        raise APIError(400, f"{len(runs)} choices (prompts x n) exceed the server's queue of "
                       f"{sched.incoming.maxsize}", param="n")
    if server.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="unavailable",
                       headers={"Retry-After": str(server.retry_after)})
    loop = asyncio.get_running_loop()
    reqs = []
    try:
        for i, (ids, p) in enumerate(runs):
            reqs.append(sched.submit(ids, p, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)),
                                     images=images))
    except (QueueFull, NotRunning, ValueError) as e:
        for r in reqs:
            r.cancel()
        retry = {"Retry-After": str(server.retry_after)}
        if isinstance(e, QueueFull):
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                           code="queue_full", headers=retry) from None
        if isinstance(e, NotRunning):
            raise APIError(503, str(e), type="server_error", code="unavailable", headers=retry) from None
        raise APIError(400, str(e)) from None
    return reqs


async def next_event(request: Request, events: asyncio.Queue, poll: dict):
    """The next (index, Event), or None once the client has gone away. The client is checked at
    least every DISCONNECT_POLL seconds, also while events keep coming (`poll` keeps the time of
    the last check)."""
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() - poll.setdefault("at", loop.time()) >= DISCONNECT_POLL:
            poll["at"] = loop.time()
            if await request.is_disconnected():
                return None
        if not events.empty():
            return events.get_nowait()
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL)
        except asyncio.TimeoutError:
            pass


def _token_text(tok, t: int) -> str:
    return tok.decode([t])


def chat_logprobs(tok, entries) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(t, lp):
        s = _token_text(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}
    return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries]}


def completion_logprobs(tok, entries, offset: int = 0) -> dict:
    """OpenAI's completions shape: tokens, token_logprobs, top_logprobs ({text: lp}), text_offset.
    An entry of None (the prompt's first token) has no log-prob."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        t, lp, top = e if e is not None else (None, None, None)
        text = _token_text(tok, t) if t is not None else ""
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else {_token_text(tok, i): v for i, v in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


class Choice:
    """One run's accumulated answer."""

    def __init__(self, echo: str = ""):
        self.text, self.logprobs, self.final = echo, [], None


def _finish(reason: str | None, calls: bool) -> str:
    return "tool_calls" if calls else ("length" if reason == "length" else "stop")


async def respond(server, request: Request, kind: str, job, stream: bool, include_usage: bool):
    """Submit the job's runs and answer with one JSON body or an SSE stream."""
    events: asyncio.Queue = asyncio.Queue()
    reqs = submit(server, job.runs, events, job.images)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    t0 = time.perf_counter()
    choices = [Choice(job.echo[job.choice_prompt[i]] if job.echo else "") for i in range(len(job.runs))]
    ctx = dict(server=server, request=request, kind=kind, job=job, events=events, reqs=reqs, rid=rid, t0=t0,
               choices=choices)
    if not stream:
        try:
            return await _whole(**ctx)
        finally:
            for r in reqs:
                r.cancel()
    return StreamingResponse(_sse(**ctx, include_usage=include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _on_event(server, choices, i, ev, t0, last) -> None:
    c = choices[i]
    if not c.logprobs and not c.text and ev.token_ids:
        server.metrics.first_token(time.perf_counter() - t0)
    elif ev.token_ids:
        server.metrics.per_token(time.perf_counter() - last.get(i, t0), len(ev.token_ids))
    last[i] = time.perf_counter()
    c.text += ev.text
    c.logprobs += ev.logprobs or []
    if ev.finish_reason is not None:
        c.final = ev


def usage(job, choices) -> dict:
    finals = [c.final for c in choices]
    cached = [min(f.cached_tokens for f, p in zip(finals, job.choice_prompt) if p == k) for k in range(len(job.prompts))]
    completion = 0 if job.drop_output else sum(f.completion_tokens for f in finals)
    prompt = sum(len(ids) for ids in job.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached)}}


def _best(job, choices) -> list[int]:
    """Indices of the runs to return: all, or per prompt the n best by total log-probability."""
    if len(job.runs) == job.n * len(job.prompts):
        return list(range(len(job.runs)))
    keep = []
    for k in range(len(job.prompts)):
        runs = [i for i, p in enumerate(job.choice_prompt) if p == k]
        keep += sorted(runs, key=lambda i: -sum(lp for _, lp, _ in choices[i].logprobs))[:job.n]
    return keep


async def _whole(server, request, kind, job, events, reqs, rid, t0, choices):
    tok, last, poll = server.tokenizer, {}, {}
    while any(c.final is None for c in choices):
        got = await next_event(request, events, poll)
        if got is None:
            return error_response(499, "client disconnected")
        i, ev = got
        if ev.finish_reason == "error":
            raise APIError(500, ev.error or "generation failed", type="server_error")
        _on_event(server, choices, i, ev, t0, last)
    server.metrics.tokens(sum(len(p) for p in job.prompts), sum(c.final.completion_tokens for c in choices))
    out = []
    for index, i in enumerate(_best(job, choices)):
        c = choices[i]
        if kind == "chat":
            s = ReasoningSplitter(job.inside)
            (r1, c1), (r2, c2) = s.feed(c.text), s.flush()
            content, calls, note = parse_tool_calls(c1 + c2) if job.tools else (c1 + c2, [], None)
            msg = {"role": "assistant", "content": content or (None if calls else ""),
                   "reasoning_content": (r1 + r2) or None}
            if calls:
                msg["tool_calls"] = calls
            choice = {"index": index, "message": msg, "finish_reason": _finish(c.final.finish_reason, bool(calls)),
                      "logprobs": chat_logprobs(tok, c.logprobs) if job.want_logprobs else None}
            if note:
                choice["note"] = note
        else:
            text = c.text if not job.drop_output else (job.echo or [""])[job.choice_prompt[i]]
            lps = None
            if job.want_logprobs:
                entries = (c.final.prompt_logprobs or []) if job.echo else []
                entries = entries + ([] if job.drop_output else c.logprobs)
                lps = completion_logprobs(tok, entries)
            choice = {"index": index, "text": text, "finish_reason": _finish(c.final.finish_reason, False),
                      "logprobs": lps}
        out.append(choice)
    server.log_completion(rid, kind, job, [c.text for c in choices], time.perf_counter() - t0)
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": server.model_name, "choices": out, "usage": usage(job, choices)}


async def _sse(server, request, kind, job, events, reqs, rid, t0, choices, include_usage):
    """The streamed answer: chunks as events arrive, [DONE] at the end (long: the chat and
    completions chunk shapes are written side by side)."""
    tok, last, n, poll = server.tokenizer, {}, len(job.runs), {}
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    splitters = [ReasoningSplitter(job.inside) for _ in range(n)]
    calls = [ToolCallStream() if job.tools else None for _ in range(n)]

    def chunk(chs, extra=None):
        body = {"id": rid, "object": obj, "created": int(time.time()), "model": server.model_name,
                "choices": chs, **(extra or {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(i, ev, finish):
        lp = ev.logprobs if job.want_logprobs else None
        if kind != "chat":
            return {"index": i, "text": ev.text, "finish_reason": finish,
                    "logprobs": completion_logprobs(tok, lp) if lp is not None else None}
        d = {}
        r, c = splitters[i].feed(ev.text)
        if finish is not None:
            r2, c2 = splitters[i].flush()
            r, c = r + r2, c + c2
        if calls[i] is not None:
            c, tool_deltas = calls[i].feed(c)
            if finish is not None:
                c += calls[i].flush()
            if tool_deltas:
                d["tool_calls"] = tool_deltas
            if finish is not None and calls[i].started:
                finish = "tool_calls"
        if r:
            d["reasoning_content"] = r
        if c:
            d["content"] = c
        return {"index": i, "delta": d, "finish_reason": finish,
                "logprobs": chat_logprobs(tok, lp) if lp else None}

    try:
        if kind == "chat":
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None} for i in range(n)])
        elif job.echo:
            yield chunk([{"index": i, "text": c.text, "finish_reason": None, "logprobs": None}
                         for i, c in enumerate(choices)])
        while any(c.final is None for c in choices):
            got = await next_event(request, events, poll)
            if got is None:
                return
            i, ev = got
            if ev.finish_reason == "error":
                yield f"data: {json.dumps(error_body(ev.error or 'generation failed', 'server_error'))}\n\n"
                return
            _on_event(server, choices, i, ev, t0, last)
            finish = None if ev.finish_reason is None else _finish(ev.finish_reason, False)
            d = delta(i, ev, finish)
            if finish is not None or d.get("text") or d.get("delta") or d.get("logprobs"):
                yield chunk([d])
        server.metrics.tokens(sum(len(p) for p in job.prompts), sum(c.final.completion_tokens for c in choices))
        server.log_completion(rid, kind, job, [c.text for c in choices], time.perf_counter() - t0)
        if include_usage:
            yield chunk([], {"usage": usage(job, choices)})
        yield "data: [DONE]\n\n"
    finally:  # finished, failed or the client went away: free the slots
        for r in reqs:
            r.cancel()
