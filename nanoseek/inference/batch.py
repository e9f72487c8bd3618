"""The inference core's step function: sequences in the slots of a latent cache, advanced together.

    batch = Batch(engine, slots=16, context=4096, speculative="mtp", max_batched_tokens=512,
                  cache=PagedLatentCache.for_budget(...))
    batch.admit([Sequence(prompt, SamplingParams(max_tokens=64, top_k=50))])
    batch.step()                                  # decode every running row, then prefill within the budget
    finished, preempted = batch.leave(), batch.take_preempted()

Rows live in cache slots in two runs: ``rows[:running]`` are decoding, ``rows[running:]`` wait to
be prefilled, in admission order. ``admit`` restores cached prompt prefixes (copied latents, or
shared pages) and, without a token budget, prefills at once: the prompts right-padded in one
expanded-MLA forward, each row's first token sampled. With a budget (chunked prefill) ``step``
decodes the running rows and prefills waiting rows with what is left (whole prompts together, or a
chunk of the first one alone) in one ragged forward, so a long prompt never stalls the rows that
are streaming and the weights are read once for both. Decoding is one absorbed-MLA forward for
every running row, or with MTP one forward that verifies each row's draft and makes the next
token, followed by the MTP module's forward that drafts again.

A paged cache can run out of pages: the batch first evicts prefix-cache blocks, then preempts the
row admitted last (its pages go back; ``take_preempted`` hands it to the caller, who admits it
again later: it is recomputed from its prompt and the tokens it made, then continues where it was).
Consecutive identical prompts admitted together (n choices, a GRPO group) are prefilled once on a
paged cache; the others share its pages (copy-on-write) and draw their own first token from the
same logits.

Rows that share settings and a generator are sampled in one call, so a seed reproduces a batch.
A forward or sampling failure ends only the rows it concerns (reason "error").
"""

from __future__ import annotations

import time
import warnings

import torch

from .cache import PagedLatentCache, PrefixCache
from .logits import controlled, needs_control, record_logprobs, record_prompt_logprobs
from .sampling import draw, greedy_accept, sample, sampling_probs, speculative_accept
from .sequence import SamplingParams, Sequence

SPECULATIVE = (None, "mtp")


def _groups(seqs: list[Sequence], skip=()) -> list[tuple[list[int], SamplingParams, torch.Generator | None]]:
    """Rows that can be sampled in one call: all greedy rows together, sampled rows by identical
    settings and generator. Finished rows (and `skip`) are left out."""
    groups: dict = {}
    for i, s in enumerate(seqs):
        if s.finish_reason is not None or i in skip:
            continue
        p = s.params
        key = None if p.temperature <= 0 else (p.temperature, p.top_k, p.top_p, p.min_p, id(s.generator))
        groups.setdefault(key, []).append(i)
    return [(idx, seqs[idx[0]].params, seqs[idx[0]].generator) for idx in groups.values()]


def _fail(seqs: list[Sequence], idx: list[int], what: str, e: Exception) -> None:
    for i in idx:
        seqs[i].finish("error", f"{what} failed: {type(e).__name__}: {e}", e)


class Batch:
    """Sequences in the slots of one latent cache; see the module docstring."""

    def __init__(self, engine, slots: int, context: int, speculative: str | None = None,
                 prefix: PrefixCache | None = None, cache=None, max_batched_tokens: int | None = None,
                 chunk_cost: float | None = None):
        """max_batched_tokens: tokens per step, decode rows + prefill chunks (None: a prompt is
        prefilled whole when admitted). chunk_cost: while rows decode, size each prefill chunk so
        its tokens add about this many decode steps (measured as the batch runs: a CPU prefills a
        token much slower than a GPU, so no fixed token count keeps streams smooth everywhere);
        capped by max_batched_tokens. The chunk rides in the decode rows' forward (a ragged
        forward: the weights are read once for both), so a streaming row's gap is ~(1 +
        chunk_cost)x its idle one; with MTP drafting or on DeepSeek-V4's cache the chunk gets a
        forward of its own, which adds about one decode step more."""
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative={speculative!r}: expected None or 'mtp'")
        if speculative == "mtp" and not engine.model.mtp_layers:
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        if max_batched_tokens is not None and max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens={max_batched_tokens}: must be >= 1")
        self.engine, self.mtp, self.slots = engine, speculative == "mtp", slots
        self.cache = engine.new_cache(slots, context, mtp_layers=int(self.mtp)) if cache is None else cache
        self.prefix = engine.prefix if prefix is None else prefix
        if self.prefix.max_bytes and not self.cache.prefix_cache:
            warnings.warn(f"{engine.config.model_type}'s cache keeps no prompt prefixes: prefix caching is off")
            self.prefix = PrefixCache(0)
        self.paged = isinstance(self.cache, PagedLatentCache)
        if self.paged and self.prefix.max_bytes and self.prefix.block != self.cache.page_size:
            raise ValueError(f"prefix blocks of {self.prefix.block} tokens need pages of as many "
                             f"(page_size={self.cache.page_size})")
        self.budget, self.chunk_cost = max_batched_tokens, chunk_cost
        self._seconds = {"decode_step": None, "prefill_token": None}  # moving averages; a token's share of a
        # chunk is what the chunk took beyond a decode step (the fixed cost of any forward)
        self.eos = engine.eos_ids
        self.rows: list[Sequence] = []  # rows[i] lives in cache slot i
        self.running = 0  # rows[:running] decode; the rest wait to be prefilled
        self.preempted: list[Sequence] = []
        self.stats = dict(steps=0, rows_decoded=0, row_forwards=0, new_tokens=0, drafted=0, accepted=0,
                          prompt_tokens=0, cached_tokens=0, prefill_tokens=0, preempted=0,
                          prefill_s=0.0, decode_s=0.0)

    @property
    def context(self) -> int:
        return self.cache.max_len

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    # ------------------------------------------------------------------ admission and prefill
    def admit(self, seqs: list[Sequence]) -> None:
        """Take `seqs` into free slots; without a token budget, prefill them now (each then has its
        first token, or its error)."""
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences for {self.free} free slots")
        prev = None
        for s in seqs:
            slot, ids = len(self.rows), s.context_ids()
            fresh = not s.out
            if self.paged and fresh and prev is not None and not prev.out and prev.prompt == s.prompt \
                    and s.params.prompt_logprobs is None and s.images is None and prev.images is None:
                s.twin = prev.twin or prev  # prefilled once: this row shares the first one's pages
                s.prefilled = 0
            else:
                # at least the last token is prefilled; prompt log-probs need every position's logits
                # an image prompt's placeholder ids do not identify its images: never shared
                reuse = s.params.prompt_logprobs is None and s.images is None
                blocks = self.prefix.lookup(ids, len(ids) - 1) if reuse else []
                if blocks:
                    self.cache.restore(slot, blocks)
                s.prefilled = len(blocks) * self.prefix.block
            s.length = s.prefilled
            s.cached_tokens = s.prefilled if fresh else s.cached_tokens
            self.rows.append(s)
            prev = s
        if self.budget is None and self.chunk_cost is None:
            self._prefill(None)

    def _take_prefill(self, budget: int | None) -> list[tuple[int, int]]:
        """(row, tokens) to prefill in one forward, in order: whole prompts while they fit the
        budget, else a chunk of the first alone; a twin rides along with its completing first."""
        take, left, completing = [], budget, set()
        for i in range(self.running, len(self.rows)):
            s = self.rows[i]
            if s.twin is not None:
                if id(s.twin) not in completing:
                    break
                take.append((i, 0))
                continue
            need = len(s.context_ids()) - s.prefilled
            if left is None or need <= left:
                n = need
            elif not take and left > 0:
                n = left  # a chunk: the rest waits for the next step
            else:
                break
            if not self._make_room(i, s.prefilled + n, s.prefilled):
                break
            take.append((i, n))
            if n == need:
                completing.add(id(s))
            left = None if left is None else left - n
            if n < need:
                break
        return take

    @torch.inference_mode()
    def _prefill(self, budget: int | None) -> None:
        """Prefill waiting rows (see _take_prefill) through the expanded path; rows whose context is
        complete make their first token (a resumed row keeps the one it had) and start decoding.
        A cache that takes no padding (DeepSeek-V4's) gets one forward per row."""
        take = self._take_prefill(budget)
        for part in ([[t] for t in take] if self.cache.unpadded else [take]):
            self._prefill_rows(part)

    def _prefill_rows(self, take: list[tuple[int, int]]) -> None:
        part = self._prefill_part(take)
        if part is None:
            return
        t0 = time.perf_counter()
        seqs, ids, positions, cache, absorb = part["seqs"], part["ids"], part["positions"], part["cache"], part["absorb"]
        try:
            embeds = self.engine.embed_images(ids, seqs) if any(s.images is not None for s in seqs) else None
            hidden = self.engine.forward(ids, positions, cache, absorb=absorb, inputs_embeds=embeds)  # [B, T, D]
            self._prefilled(take, part, hidden)
        except Exception as e:  # the forward itself failed: these rows (and their twins) end
            _fail(self.rows, [i for i, _ in take], "prefill", e)
            return
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _prefill_part(self, take: list[tuple[int, int]]) -> dict | None:
        """The forward's inputs for prefilling `take` (see _take_prefill): the rows' next tokens
        right-padded into ids [B, T], their positions, the cache view and the attention path;
        None when only twins are taken (nothing to compute)."""
        real = [(i, n) for i, n in take if self.rows[i].twin is None]
        if not real:
            return None
        dev = self.engine.device
        seqs = [self.rows[i] for i, _ in real]
        ctx = [s.context_ids() for s in seqs]
        ids = torch.zeros(len(real), max(n for _, n in real), dtype=torch.long, device=dev)
        for b, ((_, n), s, c) in enumerate(zip(real, seqs, ctx)):
            ids[b, :n] = torch.tensor(c[s.prefilled:s.prefilled + n], dtype=torch.long)
        starts = torch.tensor([s.prefilled for s in seqs], device=dev)
        # padding positions run past a row's tokens (overwritten before anything attends to them)
        positions = (starts[:, None] + torch.arange(ids.shape[1], device=dev)).clamp_max(self.context - 1)
        slots = [i for i, _ in real]
        cache = self.cache.view(slots[0], slots[-1] + 1) if slots == list(range(slots[0], slots[-1] + 1)) \
            else self.cache.subset(slots)
        # a short chunk after a cached prefix attends in latent space: the expanded path up-projects
        # every earlier key again for each chunk, which makes a prompt in small chunks cost O(length^2)
        cfg = self.engine.config
        R, dn = cfg.kv_lora_rank, cfg.qk_nope_head_dim
        short = ids.shape[1] * (R - dn) < R * (dn + cfg.v_head_dim)  # latent scores cost less than up-projection
        absorb = short and min(s.prefilled for s in seqs) > 0
        return dict(real=real, seqs=seqs, ctx=ctx, ids=ids, positions=positions, cache=cache, absorb=absorb)

    def _prefilled(self, take: list[tuple[int, int]], part: dict, hidden: torch.Tensor) -> None:
        """After the prefill forward of `part` (hidden [B, T, D]): first tokens of the rows it
        completes, prompt log-probs, MTP drafts; the rows advance and completed ones start decoding."""
        real, seqs, ctx, positions = part["real"], part["seqs"], part["ctx"], part["positions"]
        dev = hidden.device
        done = [s.prefilled + n == len(c) for (_, n), s, c in zip(real, seqs, ctx)]
        rows_b = torch.arange(len(real), device=dev)
        at = torch.tensor([n - 1 for _, n in real], device=dev)
        logits = self.engine.logits(hidden[rows_b, at])
        firsts = self._first_tokens(take, seqs, done, logits)
        for b, ((_, n), s) in enumerate(zip(real, seqs)):
            if s.params.prompt_logprobs is not None and not s.out:
                record_prompt_logprobs(s, self.engine.logits(hidden[b, :n]), s.prefilled)
        if self.mtp:  # MTP entry i reads (h_i, t_{i+1}); a completed row's last position pairs with its new token
            nxt = [c[s.prefilled + 1:s.prefilled + n + 1] + ([firsts[id(s)]] if d else []) for (_, n), s, c, d
                   in zip(real, seqs, ctx, done)]
            next_ids = torch.zeros_like(part["ids"])
            for b, row in enumerate(nxt):
                next_ids[b, :len(row)] = torch.tensor([max(t, 0) for t in row], dtype=torch.long)
            g = self.engine.mtp_forward(hidden, next_ids, positions, part["cache"], absorb=part["absorb"])
            self._propose(seqs, self.engine.logits(g[rows_b, at]), only=done)
        for (i, n), s in zip(real, seqs):
            s.prefilled += n
            s.length = s.prefilled
        self._complete(take, firsts)
        self.stats["prefill_tokens"] += sum(n for _, n in real)
        self.stats["row_forwards"] += len(real)

    def _first_tokens(self, take, seqs, done, logits) -> dict[int, int]:
        """The first new token of every row this forward completes, by id(sequence): sampled from
        the last logits (twins draw their own from their first's), or a resumed row's own."""
        firsts, twin_rows, twin_logits = {}, [], []
        for b, (s, d) in enumerate(zip(seqs, done)):
            if d and s.out:
                firsts[id(s)] = s.last
        fresh = [b for b, (s, d) in enumerate(zip(seqs, done)) if d and not s.out]
        row_of = {id(seqs[b]): b for b in fresh}
        for i, _ in take:
            t = self.rows[i].twin
            if t is not None and id(t) in row_of:
                twin_rows.append(self.rows[i])
                twin_logits.append(logits[row_of[id(t)]])
        picked = self._pick([seqs[b] for b in fresh] + twin_rows,
                            torch.stack([logits[b] for b in fresh] + twin_logits) if fresh else logits[:0])
        for s, t in zip([seqs[b] for b in fresh] + twin_rows, picked):
            firsts[id(s)] = t
        return firsts

    def _complete(self, take, firsts: dict[int, int]) -> None:
        """Rows whose context is now cached start decoding: twins take their first's pages, fresh
        rows are remembered by the prefix cache and account their first token."""
        for i, _ in take:
            s = self.rows[i]
            if s.twin is not None:
                if s.twin.finish_reason == "error":
                    s.finish("error", s.twin.error, s.twin.exception)
                    continue
                first = self.rows.index(s.twin)
                self.cache.fork(first, i, s.twin.length)
                s.prefilled = s.length = s.twin.length
                s.draft, s.q = s.twin.draft, s.twin.q
            if s.prefilled < len(s.context_ids()) or i != self.running:
                break  # a chunk: the row keeps waiting
            self.running += 1
            if s.twin is None and not s.out and s.images is None:
                slot = i
                self.prefix.insert(s.prompt, lambda k, slot=slot: self.cache.snapshot(slot, k, self.prefix.block))
            if not s.out:  # fresh: its first token; a resumed row already has `last`
                self.stats["prompt_tokens"] += len(s.prompt)
                self.stats["cached_tokens"] += s.cached_tokens
                if s.finish_reason is None and firsts.get(id(s), -1) >= 0:
                    s.last = firsts[id(s)]
                    self.stats["new_tokens"] += s.add([s.last], self.eos)

    # ------------------------------------------------------------------ room in a paged cache
    def _make_room(self, i: int, length: int, write_from: int) -> bool:
        """Pages for row i up to `length`: evict prefix blocks, then preempt rows after it, as needed."""
        while not self.cache.reserve(i, length, write_from):
            if self.prefix.evict():
                continue
            if len(self.rows) - 1 > i:
                self._preempt(len(self.rows) - 1)
                continue
            return False
        return True

    def _preempt(self, j: int) -> None:
        s = self.rows.pop(j)
        assert j == len(self.rows), "only the last row is preempted"
        self.cache.release(j)
        self.running = min(self.running, j)
        s.preempt()
        self.preempted.append(s)
        self.stats["preempted"] += 1

    def take_preempted(self) -> list[Sequence]:
        """Rows preempted since the last call, oldest admission first: admit them again later."""
        out, self.preempted = self.preempted[::-1], []
        return out

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def step(self) -> None:
        """One decode (or MTP verify + draft) forward for the running rows, then prefill of waiting
        rows within the token budget. Finished rows must have left (``leave``) first."""
        t0 = time.perf_counter()
        per_row = 2 if self.mtp else 1
        i = 0
        while i < self.running:  # pages for this step's writes; the rows admitted last yield theirs
            s = self.rows[i]
            if self._make_room(i, s.length + per_row, s.length):
                i += 1
            elif i > 0:  # the rows before it hold the pool: this one waits its turn
                self._preempt(i)
            else:  # alone in the pool and still too long for it: it ends, its writes go nowhere
                s.finish("error", f"the KV cache ({self.cache.capacity} tokens) cannot hold this "
                         f"sequence's {s.length + per_row} tokens")
                i += 1
        n = self.running
        take = self._take_prefill(self._prefill_budget(n)) if n and self._rides_along() else []
        if take:  # a prefill chunk joins the decode rows' forward
            self._decode_and_prefill(take, t0)
            return
        if n:
            t1 = time.perf_counter()
            try:
                (self._verify_step if self.mtp else self._decode_step)()
            except Exception as e:  # nothing to blame one row for: every running row fails
                _fail(self.rows, list(range(n)), "decode", e)
            self._average("decode_step", time.perf_counter() - t1)
            self._count_decode(n)
        self.stats["decode_s"] += time.perf_counter() - t0
        if self.running < len(self.rows):
            t1, before = time.perf_counter(), self.stats["prefill_tokens"]
            self._prefill(self._prefill_budget(n * per_row))
            done = self.stats["prefill_tokens"] - before
            if done:
                fixed = self._seconds["decode_step"] or 0.0
                self._average("prefill_token", max(time.perf_counter() - t1 - fixed, 1e-6) / done)

    def _count_decode(self, n: int) -> None:
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += n
        self.stats["row_forwards"] += n

    def _rides_along(self) -> bool:
        """Whether this step prefills inside the decode forward (a ragged forward): in chunked mode,
        while rows decode and others wait, except with MTP drafting, on a cache that takes no
        padding (DeepSeek-V4), with image prompts waiting, and before one plain decode step has
        been timed (chunks are sized by it)."""
        return (self.running < len(self.rows) and (self.budget is not None or self.chunk_cost is not None)
                and not self.mtp and not self.cache.unpadded and self._seconds["decode_step"] is not None
                and all(s.images is None for s in self.rows[self.running:]))

    def _decode_and_prefill(self, take: list[tuple[int, int]], t0: float) -> None:
        """One ragged forward (``Engine.forward_ragged``): every running row's next token, and the
        prefill of `take`. The weights are read once for both, so a streaming row's gap grows only
        by the chunk's own compute: ~(1 + chunk_cost)x its idle gap."""
        rows = self.rows[:self.running]
        part = self._prefill_part(take)  # never None: a twin is taken only with the row it shares
        ids, positions = self._decode_inputs(rows)
        try:
            hidden = self.engine.forward_ragged([(ids, positions, self.cache.view(0, len(rows)), True),
                                                 (part["ids"], part["positions"], part["cache"], part["absorb"])])
        except Exception as e:  # the shared forward failed: its decode rows and prefill rows end
            _fail(self.rows, list(range(len(rows))) + [i for i, _ in take], "forward", e)
            self._count_decode(len(rows))
            return
        try:
            self._advance(rows, hidden[0])
        except Exception as e:
            _fail(self.rows, list(range(len(rows))), "decode", e)
        self._count_decode(len(rows))
        try:
            self._prefilled(take, part, hidden[1])
        except Exception as e:
            _fail(self.rows, [i for i, _ in take], "prefill", e)
        seconds, fixed = time.perf_counter() - t0, self._seconds["decode_step"]
        self.stats["decode_s"] += min(seconds, fixed)
        self.stats["prefill_s"] += max(seconds - fixed, 0.0)
        self._average("prefill_token", max(seconds - fixed, 1e-6) / sum(n for _, n in part["real"]))

    def _average(self, what: str, seconds: float) -> None:
        old = self._seconds[what]
        self._seconds[what] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def _prefill_budget(self, decode_tokens: int) -> int | None:
        """Prefill tokens for this step: what the token budget leaves after the decode rows, and,
        with chunk_cost, no more than about chunk_cost decode steps' worth while rows decode."""
        left = None if self.budget is None else max(self.budget - decode_tokens, self.budget // 4, 1)
        per_step, per_token = self._seconds["decode_step"], self._seconds["prefill_token"]
        if self.chunk_cost is not None and decode_tokens:
            timed = 16 if per_step is None or not per_token else max(1, int(self.chunk_cost * per_step / per_token))
            left = timed if left is None else min(left, timed)
        return left

    def _decode_step(self) -> None:
        """Feed every row its newest token at its own position; pick each row's next one."""
        rows = self.rows[:self.running]
        ids, positions = self._decode_inputs(rows)
        self._advance(rows, self.engine.decode(ids, positions, self.cache.view(0, len(rows))))

    def _decode_inputs(self, rows: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.engine.device
        return torch.tensor([[s.last] for s in rows], device=dev), torch.tensor([[s.length] for s in rows], device=dev)

    def _advance(self, rows: list[Sequence], hidden: torch.Tensor) -> None:
        """Each decoding row's next token from its hidden [n, 1, D]."""
        tokens = self._pick(rows, self.engine.logits(hidden[:, 0]))
        for s, t in zip(rows, tokens):
            if s.finish_reason is None:
                s.length, s.last = s.length + 1, t
                self.stats["new_tokens"] += s.add([t], self.eos)

    def _verify_step(self) -> None:
        """Verify each row's MTP draft and make the next token in one forward, then draft again.

        The main model reads [last, draft] at positions n, n+1. If the draft is accepted both are
        kept, plus the token sampled after it; else the draft's cache entry at n+1 is stale and the
        row's length simply stops at n+1 (it is overwritten next step). The MTP module then reads
        (h_n, t_{n+1}) and, if accepted, (h_{n+1}, t_{n+2}), and drafts from the last of them.
        """
        rows, dev = self.rows[:self.running], self.engine.device
        n = len(rows)
        lengths = torch.tensor([s.length for s in rows], device=dev)
        last = torch.tensor([s.last for s in rows], device=dev)
        draft = torch.tensor([s.draft for s in rows], device=dev)
        positions = lengths[:, None] + torch.arange(2, device=dev)  # [n, 2]
        cache = self.cache.view(0, n)
        hidden = self.engine.forward(torch.stack((last, draft), dim=1), positions, cache, absorb=True)
        accepted, nxt = self._verify(rows, self.engine.logits(hidden), draft)
        T = int(accepted.max()) + 1  # 1 when every row rejected: the MTP module reads one token
        next_ids = torch.stack((torch.where(accepted > 0, draft, nxt), nxt), dim=1)[:, :T]
        g = self.engine.mtp_forward(hidden[:, :T], next_ids, positions[:, :T], cache, absorb=True)
        self._propose(rows, self.engine.logits(g[torch.arange(n, device=dev), accepted]))
        for s, d, x, a in zip(rows, draft.tolist(), nxt.tolist(), accepted.tolist()):
            if s.finish_reason is None:
                s.length, s.last = s.length + 1 + a, x
                self.stats["new_tokens"] += s.add([d, x] if a else [x], self.eos)
                self.stats["drafted"] += 1
                self.stats["accepted"] += a

    # ------------------------------------------------------------------ token choice, per group of rows
    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """logits [n, V] -> each row's next token under its own settings and controls (logits.py;
        -1 for a row that failed)."""
        tokens, raw = [-1] * len(seqs), logits
        try:
            logits = controlled(seqs, logits, self.eos)
        except Exception as e:  # a guide or a control failed: those rows end, the rest go on
            _fail(seqs, [i for i, s in enumerate(seqs) if needs_control(s)], "logits control", e)
        for idx, p, gen in _groups(seqs):
            try:
                got = logits[idx].argmax(-1) if p.temperature <= 0 else \
                    sample(logits[idx], p.temperature, p.top_k, p.top_p, gen, p.min_p)
            except Exception as e:  # a kernel error on one request's settings ends only its rows
                _fail(seqs, idx, "sampling", e)
                continue
            for i, t in zip(idx, got.tolist()):
                tokens[i] = t
        record_logprobs(seqs, raw, tokens)
        return tokens

    def _propose(self, seqs: list[Sequence], logits: torch.Tensor, only: list[bool] | None = None) -> None:
        """MTP's logits [n, V] -> each row's draft and the distribution it came from (None if greedy)."""
        for idx, p, gen in _groups(seqs):
            idx = [i for i in idx if only is None or only[i]]
            if not idx:
                continue
            try:
                if p.temperature <= 0:
                    q, drafts = None, logits[idx].argmax(-1)
                else:
                    q = sampling_probs(logits[idx], p.temperature, p.top_k, p.top_p, p.min_p)
                    drafts = draw(q, gen)
            except Exception as e:
                _fail(seqs, idx, "sampling", e)
                continue
            for j, (i, d) in enumerate(zip(idx, drafts.tolist())):
                seqs[i].draft, seqs[i].q = d, None if q is None else q[j]

    def _verify(self, seqs: list[Sequence], logits: torch.Tensor, draft: torch.Tensor):
        """logits [n, 2, V] at [last, draft] -> (accepted [n] in {0, 1}, next token [n]). Rows
        with controls reject their draft and choose from the first position's controlled logits."""
        accepted = torch.zeros(len(seqs), dtype=torch.long, device=logits.device)
        nxt = torch.zeros_like(accepted)
        ctl = [i for i, s in enumerate(seqs) if s.finish_reason is None and needs_control(s)]
        if ctl:
            picked = self._pick([seqs[i] for i in ctl], logits[ctl, 0])  # -1 where one failed
            nxt[ctl] = torch.tensor([max(t, 0) for t in picked], device=logits.device)
        for idx, p, gen in _groups(seqs, set(ctl)):
            try:
                if p.temperature <= 0:
                    a, x = greedy_accept(logits[idx], draft[idx, None])
                else:
                    probs = sampling_probs(logits[idx], p.temperature, p.top_k, p.top_p, p.min_p)
                    q = torch.stack([seqs[i].q for i in idx])[:, None]
                    a, x = speculative_accept(probs, q, draft[idx, None], gen)
            except Exception as e:
                _fail(seqs, idx, "sampling", e)
                continue
            accepted[idx], nxt[idx] = a, x
        return accepted, nxt

    # ------------------------------------------------------------------ leaving
    def leave(self) -> list[Sequence]:
        """Take finished rows out (returned); the runs of decoding and waiting rows stay packed."""
        done, i = [], 0
        while i < len(self.rows):
            if self.rows[i].finish_reason is None:
                i += 1
                continue
            done.append(self.rows[i])
            self._remove(i)
        return done

    def _remove(self, i: int) -> None:
        """Free slot i: the last decoding row moves into it (if it was decoding), and the last
        waiting row into the hole that leaves."""
        self.cache.release(i)
        hole = i
        if i < self.running:
            self.running -= 1
            hole = self.running
            if i != hole:
                self._move(hole, i)
        last = len(self.rows) - 1
        if hole != last:
            self._move(last, hole)
        self.rows.pop()

    def _move(self, src: int, dst: int) -> None:
        s = self.rows[src]
        self.cache.move(src, dst, max(s.length, s.prefilled))
        self.rows[dst] = s  # a twin points at its first by object, not by slot: nothing else moves
