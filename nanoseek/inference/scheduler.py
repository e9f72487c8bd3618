"""Continuous batching: one thread owns the model and drives the inference core for every request.

    sched = Scheduler(engine, max_batch=16, queue_size=64, kv_cache_bytes=2 << 30, max_batched_tokens=512,
                      speculative="mtp").start()
    req = sched.submit(prompt_ids, SamplingParams(max_tokens=64, top_k=50, stop=["\\n\\n"]), on_event=print)
    req.cancel()       # from any thread: the request leaves at the next step and frees its slot
    sched.stop()

The scheduler is a thread and a bounded queue around one ``Batch`` (batch.py): between two steps
it admits waiting requests into free slots (preempted ones first), ends cancelled ones, lets
finished ones leave, then runs one ``Batch.step`` (decode for the running rows, prefill chunks
within the token budget) and hands each request its new final text and tokens as an ``Event``.
Sampling, stops, MTP speculation, prefix reuse, paging and preemption all live in the core, so a
row that runs alone sees exactly the forwards ``Engine.generate`` would make, and batched rows
differ from that only by floating-point summation order: greedy output matches ``Engine.generate``
prompt by prompt. With ``kv_cache_bytes`` the cache is one pool of pages of that size, so memory
is the weights plus that budget whatever the context; the prefix cache then shares pages.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from .cache import PagedLatentCache, PrefixCache
from .compressed import CompressedCache
from .batch import Batch
from .engine import Engine
from .sequence import SamplingParams, Sequence, check_prompt, new_generator


class QueueFull(Exception):
    """The waiting queue is at its bound (the API answers 429)."""


class NotRunning(Exception):
    """The scheduler is stopped or its thread died (the API answers 503)."""


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
    logprobs: list | None = None  # (token, log-prob, top alternatives) per new token, if asked
    prompt_logprobs: list | None = None  # on the last event, if asked


class Request(Sequence):
    """A sequence submitted to the scheduler, with the callback that receives its events."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None],
                 tokenizer, device):
        generator = new_generator(params.seed, device) if params.temperature > 0 else None
        super().__init__(prompt, params, tokenizer, generator)
        self.on_event = on_event


class Scheduler:
    """Owns an ``Engine`` and runs continuous batching over its requests (see the module docstring)."""

    def __init__(self, engine: Engine, max_batch: int = 16, queue_size: int = 64,
                 prefix_cache_bytes: int = 256 << 20, block: int = 16, context: int | None = None,
                 speculative: str | None = None, kv_cache_bytes: int | None = None,
                 max_batched_tokens: int | None = None, chunk_cost: float | None = None):
        """kv_cache_bytes: a paged cache of that many bytes (pages of `block` tokens) shared by all
        requests, whatever the context; None: `max_batch` slots of `context` tokens each, allocated
        up front. max_batched_tokens: tokens per step (decode rows + prefill chunks); None: a
        joining prompt is prefilled whole. chunk_cost: while requests stream, a prefill chunk
        costs about this many of their decode steps (measured), so their token gaps stay near
        (1 + chunk_cost) x the idle ones."""
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"max_batch={max_batch}, queue_size={queue_size}: both must be >= 1")
        self.engine, self.tokenizer = engine, engine.tokenizer
        cfg = engine.config
        context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        layers = cfg.num_hidden_layers + (speculative == "mtp")
        if kv_cache_bytes is None:
            cache = None
        elif cfg.attention == "v4":  # windows per slot + pages of compressed entries
            cache = CompressedCache.for_budget(kv_cache_bytes, cfg, max_batch, context, engine.dtype, engine.device,
                                               mtp_layers=int(speculative == "mtp"))
        else:
            cache = PagedLatentCache.for_budget(kv_cache_bytes, layers, block, cfg.cache_width, engine.dtype,
                                                device=engine.device, slots=max_batch, max_len=context)
        self.batch = Batch(engine, max_batch, context, speculative, PrefixCache(prefix_cache_bytes, block), cache,
                           max_batched_tokens, chunk_cost)
        self.pending: collections.deque[Request] = collections.deque()  # preempted: admitted again first
        self.incoming: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self.counts = dict(finished=0, cancelled=0)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # submit vs. the loop's exit: no request is queued after the last drain
        self._closed = False

    @property
    def context(self) -> int:
        return self.batch.context

    @property
    def rows(self) -> list[Request]:
        """The running requests (rows[i] lives in cache slot i)."""
        return self.batch.rows

    @property
    def stats(self) -> dict:
        """The core's counters (steps, rows_decoded, prompt/cached tokens, MTP drafts) plus
        finished and cancelled requests."""
        return {**self.batch.stats, **self.counts}

    @property
    def waiting(self) -> int:
        return self.incoming.qsize()

    @property
    def alive(self) -> bool:
        """True while the scheduler thread runs and takes requests."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # ------------------------------------------------------------------ API side (any thread)
    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None] = lambda e: None, images=None) -> Request:
        """Queue a request; raises ValueError (bad request), QueueFull or NotRunning.
        images: [n, D] tokens (``Engine.encode_images``) for the prompt's <image_placeholder> ids."""
        params.validate()
        check_prompt(prompt, params.max_tokens, min(self.context, self.batch.cache.capacity),
                     self.engine.config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("text stop sequences need a tokenizer")
        req = Request(prompt, params, on_event, self.tokenizer, self.engine.device)
        self.engine.check_images(prompt, images)
        req.images = images
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
            self._end(req, "cancelled")
        return len(dropped)

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="nanoseek-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stop the loop (running and waiting requests end with an error) and wait for the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    # ------------------------------------------------------------------ the loop (scheduler thread)
    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            while not self._stopping.is_set():
                if not self.rows and not self.pending:  # idle: sleep until a request arrives
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
        for req in [*self.rows, *self.pending]:
            self._end(req, "error", reason)
        self.rows.clear()
        self.pending.clear()
        while True:
            try:
                self._end(self.incoming.get_nowait(), "error", reason)
            except queue.Empty:
                return

    def step(self) -> int:
        """Admit waiting requests into free slots (preempted ones first), then one step of the core.
        Returns the number of rows still in the batch (tests drive the scheduler with this directly)."""
        while self.batch.free:
            try:
                self._admit(self.pending.popleft() if self.pending else self.incoming.get_nowait())
            except queue.Empty:
                break
        for req in self.rows:
            if req.cancelled:
                self._end(req, "cancelled")
        self._leave()
        if self.rows:
            self.batch.step()
            for req in self.rows:
                self._emit(req)
            self._leave()
            self.pending.extendleft(reversed(self.batch.take_preempted()))
        return len(self.rows)

    def _admit(self, req: Request) -> None:
        """Prefill `req` into the next free slot; its first event carries its first token (or why
        it failed)."""
        if req.cancelled:
            self._end(req, "cancelled")
            return
        self.batch.admit([req])
        if req.finish_reason is not None or req.out:  # prefilled at once: its first token (or error)
            self._emit(req)

    def _leave(self) -> None:
        self.counts["finished"] += len(self.batch.leave())

    # ------------------------------------------------------------------ outputs
    def _emit(self, req: Request) -> None:
        start = req.emitted_ids
        ids, text = req.take()
        if not ids and not text and req.finish_reason is None:
            return
        event = Event(text, ids, req.finish_reason, req.error, len(req.prompt), req.cached_tokens, len(req.out))
        if req.params.logprobs is not None:
            event.logprobs = req.logprobs[start:start + len(ids)]
        if req.finish_reason is not None:
            event.prompt_logprobs = req.prompt_logprobs
        try:
            req.on_event(event)
        except Exception:  # a broken listener must not stop the loop
            req.cancel()

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish(reason, error)
        self.counts["cancelled"] += reason == "cancelled"
        self._emit(req)
