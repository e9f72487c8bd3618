"""Continuous batching: one thread owns the model and runs every request's decode steps together.

    sched = Scheduler(engine, max_batch=16, queue_size=64, prefix_cache_bytes=256 << 20)
    sched.start()
    req = sched.submit(prompt_ids, SamplingParams(max_tokens=64, stop=["\\n\\n"]), on_event=print)
    req.cancel()       # from any thread: the request leaves at the next step and frees its slot
    sched.stop()

The latent cache has `max_batch` slots of `context` positions. Slots 0..n-1 hold the n running
requests, so a decode step is one ``Engine.forward`` over the first n rows, each row at its own
position (the engine's mask keeps rows apart). Between two steps, requests waiting in the bounded
queue are prefilled one by one into the next free slot and join; finished or cancelled ones leave,
the last row moving into the freed slot so the running rows stay contiguous. A row that runs alone
sees exactly the forwards ``Engine.generate`` would make, and batched rows differ from that only by
floating-point summation order, so greedy output matches ``Engine.generate`` prompt by prompt.

Prefix cache: after a prompt is prefilled, its latents are kept in blocks of `block` tokens, keyed
by a hash of all tokens up to the block's end and evicted least-recently-used beyond a byte budget.
A new prompt copies the latents of its longest cached block prefix into its slot and prefills only
the rest (always at least its last token, whose logits give the first new token). Latents at
position p depend only on tokens 0..p, so the copy is what a full prefill would write.

Each request carries its own sampling settings and `torch.Generator`; text stop sequences are
matched on the decoded text (a stop string can span tokens), and text that might begin one is
held back until it cannot.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generate import TextStream
from ..sampling import sample, validate_sampling


class QueueFull(Exception):
    """The waiting queue is at its bound (the API answers 429)."""


class NotRunning(Exception):
    """The scheduler is stopped or its thread died (the API answers 503)."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # text stop sequences (need a tokenizer)
    ignore_eos: bool = False  # run to max_tokens (benchmarks)


@dataclass
class Event:
    """What a request's callback receives after each of its steps."""
    text: str  # new final text ("" without a tokenizer)
    token_ids: list[int]  # new token ids (EOS excluded)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last event
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Request:
    """One sequence being generated. Created by ``Scheduler.submit``; cancel() is thread-safe."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None],
                 tokenizer, device):
        self.prompt, self.params, self.on_event = list(prompt), params, on_event
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:  # its own random seed: torch.seed() would reseed the global CPU and CUDA generators
                self.generator.seed()
        self.stream = TextStream(tokenizer) if tokenizer is not None else None
        self.out: list[int] = []  # generated ids, EOS excluded
        self.text = ""  # decoded text so far (cut at a stop sequence)
        self.emitted_text = 0  # characters of self.text already given out
        self.emitted_ids = 0
        self.length = 0  # tokens of this request in its cache slot
        self.last = -1  # newest token, made but not yet fed to the model
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def pick(self, logits: torch.Tensor) -> int:
        """logits [V] -> the next token under this request's own settings."""
        p = self.params
        return int(sample(logits[None], p.temperature, None, p.top_p, self.generator)[0])


def _stop_at(text: str, stops: list[str], start: int) -> int | None:
    """Where the earliest stop sequence ending at or after `start` begins, else None."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _held(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop sequence."""
    held = 0
    for s in stops:  # runs for every token of every row: only the tail's places where s[0] occurs are tried
        tail = text[len(text) - min(len(s) - 1, len(text)):]
        i = tail.find(s[0])
        while i >= 0 and not s.startswith(tail[i:]):
            i = tail.find(s[0], i + 1)
        held = max(held, len(tail) - i if i >= 0 else 0)
    return held


class PrefixCache:
    """Latents [layers, block, width] of prompt blocks, keyed by a hash chain over the tokens up to
    each block's end; least recently used blocks are evicted beyond `max_bytes` (0 turns it off)."""

    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def _keys(self, tokens: list[int], n_blocks: int) -> list[bytes]:
        keys, key = [], b""
        for i in range(n_blocks):
            chunk = tokens[i * self.block:(i + 1) * self.block]
            key = hashlib.blake2b(key + b"".join(t.to_bytes(4, "little") for t in chunk), digest_size=16).digest()
            keys.append(key)
        return keys

    def lookup(self, tokens: list[int], limit: int) -> torch.Tensor | None:
        """Latents [layers, n, width] of the longest cached block prefix of tokens[:limit], or None."""
        if not self.max_bytes:
            return None
        found = []
        for key in self._keys(tokens, limit // self.block):
            if key not in self.blocks:
                break
            found.append(key)
        for key in reversed(found):  # parents end up most recent: evicted after their children
            self.blocks.move_to_end(key)
        return torch.cat([self.blocks[k] for k in found], dim=1) if found else None

    def insert(self, tokens: list[int], kv: torch.Tensor) -> None:
        """Remember the full blocks of `tokens`, whose latents are kv [layers, >= len(tokens), width]."""
        if not self.max_bytes:
            return
        keys = self._keys(tokens, len(tokens) // self.block)
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            latents = kv[:, i * self.block:(i + 1) * self.block].clone()
            self.blocks[key] = latents
            self.bytes += latents.nbytes
        for key in reversed(keys):  # parents most recent: a child never outlives the blocks before it
            self.blocks.move_to_end(key)
        while self.bytes > self.max_bytes and self.blocks:
            self.bytes -= self.blocks.popitem(last=False)[1].nbytes


class Scheduler:
    """Owns an ``Engine`` and runs continuous batching over its requests (see the module docstring)."""

    def __init__(self, engine, max_batch: int = 16, queue_size: int = 64,
                 prefix_cache_bytes: int = 256 << 20, block: int = 16, context: int | None = None):
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"max_batch={max_batch}, queue_size={queue_size}: both must be >= 1")
        self.engine, self.tokenizer = engine, engine.tokenizer
        cfg = engine.config
        self.context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch = max_batch
        self.cache = engine.new_cache(max_batch, self.context)
        self.rows: list[Request] = []  # rows[i] lives in cache slot i
        self.incoming: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self.prefix = PrefixCache(prefix_cache_bytes, block)
        self.eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            self.eos.add(self.tokenizer.eos_id)
        self.stats = dict(steps=0, rows_decoded=0, prompt_tokens=0, cached_tokens=0, finished=0, cancelled=0)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # submit vs. the loop's exit: no request is queued after the last drain
        self._closed = False

    # ------------------------------------------------------------------ API side (any thread)
    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None] = lambda e: None) -> Request:
        """Queue a request; raises ValueError (bad request), QueueFull or NotRunning."""
        vocab = self.engine.config.vocab_size
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt must be a non-empty list of token ids in 0..{vocab - 1}")
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise ValueError(f"max_tokens={params.max_tokens!r}: must be a positive integer")
        if len(prompt) + params.max_tokens > self.context:
            raise ValueError(f"{len(prompt)} prompt tokens + max_tokens={params.max_tokens} exceed the "
                             f"context of {self.context} tokens")
        validate_sampling(params.temperature, None, params.top_p)
        if not all(isinstance(s, str) and s for s in params.stop):
            raise ValueError(f"stop={params.stop!r}: stop sequences must be non-empty strings")
        if params.stop and self.tokenizer is None:
            raise ValueError("text stop sequences need a tokenizer")
        req = Request(prompt, params, on_event, self.tokenizer, self.engine.device)
        with self._lock:
            if self._closed:
                raise NotRunning("the scheduler is not running")
            try:
                self.incoming.put_nowait(req)
            except queue.Full:
                if not self._drop_cancelled_waiting():
                    raise QueueFull(f"{self.incoming.maxsize} requests are already waiting") from None
                self.incoming.put_nowait(req)
        return req

    def _drop_cancelled_waiting(self) -> int:
        """Take cancelled requests (their clients gone) out of the full queue, so they do not hold
        places a live request is refused for; returns how many left."""
        q = self.incoming
        with q.mutex:
            dropped = [r for r in q.queue if r.cancelled]
            if dropped:
                live = [r for r in q.queue if not r.cancelled]
                q.queue.clear()
                q.queue.extend(live)
                q.not_full.notify(len(dropped))
        for req in dropped:
            self._finish(req, "cancelled")
        return len(dropped)

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="nanoseek-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self.incoming.qsize()

    # ------------------------------------------------------------------ the loop (scheduler thread)
    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            while not self._stopping.is_set():
                if not self.rows:  # idle: sleep until a request arrives
                    try:
                        self._admit(self.incoming.get(timeout=0.1))
                    except queue.Empty:
                        continue
                self.step()
        except BaseException as e:  # a bug here: say so to every request instead of leaving them waiting
            reason = f"the scheduler failed: {type(e).__name__}: {e}"
            raise
        finally:
            self._close(reason)

    def _close(self, reason: str) -> None:
        """Refuse new requests; end the running and the waiting ones with an error."""
        with self._lock:
            self._closed = True
        for req in self.rows:
            self._finish(req, "error", reason)
        self.rows.clear()
        while True:
            try:
                self._finish(self.incoming.get_nowait(), "error", reason)
            except queue.Empty:
                return

    def step(self) -> int:
        """Admit waiting requests into free slots, then one decode step for every running row.
        Returns the number of rows still running (tests drive the scheduler with this directly)."""
        while len(self.rows) < self.max_batch:
            try:
                self._admit(self.incoming.get_nowait())
            except queue.Empty:
                break
        for req in self.rows:
            if req.cancelled:
                self._finish(req, "cancelled")
        self._leave()
        if self.rows:
            try:
                self._decode()
            except Exception as e:  # nothing to blame one request for: all running ones fail
                for req in self.rows:
                    self._finish(req, "error", f"decode failed: {type(e).__name__}: {e}")
            self._leave()
        return len(self.rows)

    @torch.inference_mode()
    def _admit(self, req: Request) -> None:
        """Prefill `req` into the next free slot (reusing cached prefix latents) and make its first token."""
        if req.cancelled:
            self._finish(req, "cancelled")
            return
        slot, prompt, n = len(self.rows), req.prompt, len(req.prompt)
        try:
            cached = self.prefix.lookup(prompt, n - 1)
            start = 0 if cached is None else cached.shape[1]
            if start:
                self.cache.kv[:, slot, :start] = cached
            ids = torch.tensor([prompt[start:]], device=self.engine.device)
            positions = torch.arange(start, n, device=self.engine.device)[None]
            hidden = self.engine.forward(ids, positions, self.cache.view(slot, slot + 1), absorb=False)
            logits = self.engine.logits(hidden[0, -1])
            self.prefix.insert(prompt, self.cache.kv[:, slot])
            token = req.pick(logits)
        except Exception as e:
            self._finish(req, "error", f"prefill failed: {type(e).__name__}: {e}")
            return
        req.length, req.cached_tokens = n, start
        self.stats["prompt_tokens"] += n
        self.stats["cached_tokens"] += start
        self.rows.append(req)
        self._deliver(req, token)

    @torch.inference_mode()
    def _decode(self) -> None:
        """Feed every running row its newest token at its own position; pick each row's next one."""
        rows, dev = self.rows, self.engine.device
        ids = torch.tensor([[r.last] for r in rows], device=dev)
        positions = torch.tensor([[r.length] for r in rows], device=dev)
        hidden = self.engine.forward(ids, positions, self.cache.view(0, len(rows)), absorb=True)
        logits = self.engine.logits(hidden[:, 0])  # [n, V]
        greedy = logits.argmax(-1).tolist()
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += len(rows)
        for i, req in enumerate(rows):
            req.length += 1
            try:  # one row's sampling may raise (a kernel error on its settings): only that row ends
                self._deliver(req, greedy[i] if req.params.temperature <= 0 else req.pick(logits[i]))
            except Exception as e:
                self._finish(req, "error", f"sampling failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ outputs
    def _deliver(self, req: Request, token: int) -> None:
        """Account one new token of `req`: EOS, text, stop sequences, max_tokens; emit what is final."""
        req.last = token
        stops = req.params.stop
        ended = token in self.eos and not req.params.ignore_eos
        if ended:
            req.finish_reason = "stop"
        else:
            req.out.append(token)
            if req.stream is not None:
                before = len(req.text)
                req.text += req.stream.push([token])
                if len(req.out) >= req.params.max_tokens:
                    req.text += req.stream.flush()
                cut = _stop_at(req.text, stops, before) if stops else None
                if cut is not None:
                    req.text, req.finish_reason = req.text[:cut], "stop"
            if req.finish_reason is None and len(req.out) >= req.params.max_tokens:
                req.finish_reason = "length"
        if ended and req.stream is not None:
            rest = req.stream.flush()
            cut = _stop_at(req.text + rest, stops, len(req.text)) if stops else None
            req.text = (req.text + rest)[:cut]
        hold = 0 if req.finish_reason or not stops else _held(req.text, stops)
        self._emit(req, len(req.text) - hold)

    def _emit(self, req: Request, ready: int, error: str | None = None) -> None:
        text, req.emitted_text = req.text[req.emitted_text:ready], max(ready, req.emitted_text)
        ids, req.emitted_ids = req.out[req.emitted_ids:], len(req.out)
        event = Event(text, ids, req.finish_reason, error, len(req.prompt), req.cached_tokens, len(req.out))
        try:
            req.on_event(event)
        except Exception:  # a broken listener must not stop the loop
            req.cancel()

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason = reason
        self.stats["cancelled"] += reason == "cancelled"
        self._emit(req, len(req.text), error)

    def _leave(self) -> None:
        """Finished rows leave; the last running row moves into each freed slot."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].finish_reason is None:
                i += 1
                continue
            self.stats["finished"] += 1
            last = self.rows.pop()
            if i < len(self.rows):  # `last` was not the finished row: move it into slot i
                self.cache.kv[:, i, :last.length] = self.cache.kv[:, len(self.rows), :last.length]
                self.rows[i] = last
