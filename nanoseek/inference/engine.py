"""The inference core: one step function over per-request rows, which every caller drives.

    engine = Engine(load_pretrained("out/model"), tokenizer)
    outs = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)           # greedy -> [Completion]
    outs[0].tokens, outs[0].finish_reason                                     # new ids, "stop" | "length"
    outs = engine.generate(prompts, 32, temperature=0.7, top_p=0.9, seed=0)  # sampled, reproducible
    outs = engine.generate(prompts, 32, speculative="mtp")                   # MTP drafts, same output
    for new in engine.stream(prompts, 32): ...                               # new ids per prompt, as made
    engine.stats  # tokens_per_forward, acceptance_rate, prefill_s, decode_s ...

    batch = Batch(engine, slots=16, context=4096, speculative="mtp")         # what the server drives
    batch.admit([Sequence(prompt, SamplingParams(max_tokens=64, top_k=50))])
    batch.step(); finished = batch.leave()

A `Sequence` is one request's row state: its sampling settings and generator, its tokens and text,
its stop rules and finish reason. A `Batch` keeps running sequences in the slots of a latent cache
(``cache.py``) and advances them: ``admit`` prefills new sequences with the expanded MLA path
(restoring cached prompt prefixes instead of recomputing them) and makes each one's first token;
``step`` runs one absorbed-MLA decode forward for every row, or with MTP verifies each row's draft
and makes the next token in the same forward; ``leave`` takes finished rows out, moving the last
row into each freed slot. ``Engine.generate`` is "admit all, step until done"; the server's
scheduler admits from its queue between steps. Both therefore share sampling (temperature, top-k,
top-p, a generator per request), stops, finish reasons, MTP speculation and prefix reuse.

Rows that share settings and a generator (one ``generate`` call) are sampled in one call, so a seed
reproduces a batch; every request the server takes has its own generator. A forward or sampling
failure ends only the rows it concerns (reason "error"); ``Engine.generate`` raises it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from ..chat import TextStream, first_stop, held_suffix
from .cache import LatentCache, PrefixCache, attention_mask
from .logits import controlled, needs_control, record_logprobs, record_prompt_logprobs
from .sampling import (draw, greedy_accept, sample, sampling_probs, speculative_accept,
                       validate_sampling)

SPECULATIVE = (None, "mtp")


@dataclass
class SamplingParams:
    """One request's generation settings; every caller (generate, chat, serve, GRPO) fills these."""
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # text stop sequences (need a tokenizer)
    stop_token_ids: list[list[int]] = field(default_factory=list)  # stop sequences of token ids
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    # per-request logits controls (logits.py); the defaults leave the model's logits untouched
    min_p: float | None = None
    presence_penalty: float = 0.0  # OpenAI's, on generated tokens: - presence x (count > 0)
    frequency_penalty: float = 0.0  # - frequency x count
    repetition_penalty: float = 1.0  # CTRL's, on prompt and generated tokens (> 1: less likely)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS is masked until this many tokens were generated
    logprobs: int | None = None  # record each new token's log-prob and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt (skips the prefix cache)
    guide: object = field(default=None, compare=False)  # () -> a token guide (constrain.py) per sequence

    def validate(self) -> None:
        """Raise ValueError naming the first setting no sampler can honour."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be a positive integer")
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be in (0, 10]")
        if not all(isinstance(t, int) and -100 <= v <= 100 for t, v in self.logit_bias.items()):
            raise ValueError("logit_bias: token ids map to biases in [-100, 100]")
        for name in ("min_tokens", "logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0 or (name != "min_tokens" and v > 20)):
                raise ValueError(f"{name}={v!r}: must be an integer >= 0{'' if name == 'min_tokens' else ' and <= 20'}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop sequences must be non-empty strings")
        for s in self.stop_token_ids:
            if not isinstance(s, (list, tuple)) or not s or not all(isinstance(t, int) for t in s):
                raise ValueError(f"stop={self.stop_token_ids!r}: each stop sequence must be a non-empty "
                                 "list of token ids")


def check_prompt(prompt, max_tokens: int, context: int, vocab_size: int, what: str = "the prompt") -> None:
    """Raise ValueError unless `prompt` is token ids of the vocabulary that leave room for max_tokens."""
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise ValueError(f"{what} is empty: expected a non-empty list of token ids")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"{what} has a token id outside 0..{vocab_size - 1}")
    if len(prompt) + max_tokens > context:
        raise ValueError(f"{what}: {len(prompt)} prompt tokens + max_tokens={max_tokens} exceed the "
                         f"context of {context} tokens")


def new_generator(seed: int | None, device) -> torch.Generator:
    """A generator of its own: seeded, or from fresh entropy (never reseeding torch's global RNG)."""
    g = torch.Generator(device=device)
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    return g


@dataclass
class Completion:
    """What ``Engine.generate`` returns per prompt."""
    tokens: list[int]  # new token ids (EOS and a token stop sequence excluded)
    finish_reason: str  # "stop" (EOS or a stop sequence) | "length" (max_tokens)
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache


class Sequence:
    """One request's row state, advanced by a ``Batch``; ``cancel()`` is thread-safe."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer=None,
                 generator: torch.Generator | None = None):
        self.prompt, self.params, self.generator = list(prompt), params, generator
        self.stream = TextStream(tokenizer) if tokenizer is not None else None
        self.out: list[int] = []  # generated ids (EOS and a token stop sequence excluded)
        self.text = ""  # decoded text so far, cut at a text stop sequence ("" without a tokenizer)
        self.emitted_ids = self.emitted_text = 0  # how much of out / text take() has given out
        self.length = 0  # tokens of this sequence in its cache slot
        self.last = -1  # newest token, made but not yet fed to the model
        self.draft: int | None = None  # MTP's guess for the token after `last`
        self.q: torch.Tensor | None = None  # [V] the distribution the draft was drawn from (sampling)
        self.cached_tokens = 0
        self.guide = params.guide() if params.guide is not None else None  # a token mask per step
        self.logprobs: list = []  # (token, log-prob, top alternatives) per chosen token, if asked
        self.prompt_logprobs: list | None = None
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: str | None = None
        self.exception: BaseException | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def finish(self, reason: str, error: str | None = None, exception: BaseException | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error, self.exception = reason, error, exception

    def add(self, tokens: list[int], eos: set[int]) -> int:
        """Account new tokens in order (EOS, stop sequences, max_tokens); returns how many were
        taken before the sequence finished."""
        p = self.params
        for n, t in enumerate(tokens, 1):
            if self.guide is not None:
                self.guide.accept(t)
            if t in eos and not p.ignore_eos:
                self.finish("stop")
                self._add_text([], final=True)
                return n
            self.out.append(t)
            cut = first_stop(self.out, p.stop_token_ids, len(self.out) - 1) if p.stop_token_ids else None
            if cut is not None:
                del self.out[cut:]
                self.finish("stop")
            full = len(self.out) >= p.max_tokens
            if self.stream is not None:
                if cut is not None:  # the text of the cut tokens goes too
                    self.text = self.stream.tokenizer.decode(self.out)
                elif self._add_text([t], final=full):
                    self.finish("stop")
            if full:
                self.finish("length")
            if self.finish_reason is not None:
                return n
        return len(tokens)

    def _add_text(self, ids: list[int], final: bool) -> bool:
        """Decode new ids onto the text; True when a text stop sequence ended it (text cut there)."""
        if self.stream is None:
            return False
        before = len(self.text)
        self.text += self.stream.push(ids)
        if final:
            self.text += self.stream.flush()
        cut = first_stop(self.text, self.params.stop, before) if self.params.stop else None
        if cut is not None:
            self.text = self.text[:cut]
        return cut is not None

    def take(self) -> tuple[list[int], str]:
        """The tokens and text that became final since the last call. While the sequence runs, a
        tail that might begin a stop sequence is held back until it cannot."""
        running = self.finish_reason is None
        ready_ids = len(self.out) - (held_suffix(self.out, self.params.stop_token_ids) if running else 0)
        ready_text = len(self.text) - (held_suffix(self.text, self.params.stop) if running else 0)
        ids, text = self.out[self.emitted_ids:ready_ids], self.text[self.emitted_text:ready_text]
        self.emitted_ids, self.emitted_text = max(ready_ids, self.emitted_ids), max(ready_text, self.emitted_text)
        return ids, text


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
    """Running sequences in the slots of one latent cache; see the module docstring."""

    def __init__(self, engine: "Engine", slots: int, context: int, speculative: str | None = None,
                 prefix: PrefixCache | None = None):
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative={speculative!r}: expected None or 'mtp'")
        if speculative == "mtp" and not engine.model.mtp_layers:
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.engine, self.mtp = engine, speculative == "mtp"
        self.cache = engine.new_cache(slots, context, mtp_layers=int(self.mtp))
        self.prefix = engine.prefix if prefix is None else prefix
        self.eos = engine.eos_ids
        self.rows: list[Sequence] = []  # rows[i] lives in cache slot i
        self.stats = dict(steps=0, rows_decoded=0, row_forwards=0, new_tokens=0, drafted=0, accepted=0,
                          prompt_tokens=0, cached_tokens=0, prefill_s=0.0, decode_s=0.0)

    @property
    def context(self) -> int:
        return self.cache.max_len

    @property
    def free(self) -> int:
        return self.cache.kv.shape[1] - len(self.rows)

    # ------------------------------------------------------------------ admission
    @torch.inference_mode()
    def admit(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` (right-padded, one forward) into the next free slots and make each one's
        first token (and MTP draft). Blocks of a prompt found in the prefix cache are restored
        instead of recomputed, always leaving the last prompt token to prefill (its logits give
        the first new token); latents at position p depend only on tokens 0..p, so the restored
        entries are what a full prefill would write."""
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences for {self.free} free slots")
        t0, first, dev = time.perf_counter(), len(self.rows), self.engine.device
        starts = []
        for slot, s in enumerate(seqs, first):
            # prompt log-probs need every prompt position's logits: no restored prefix
            cached = None if s.params.prompt_logprobs is not None else self.prefix.lookup(s.prompt, len(s.prompt) - 1)
            starts.append(0 if cached is None else cached.shape[1])
            if cached is not None:
                self.cache.restore(slot, cached)
        lens = [len(s.prompt) - st for s, st in zip(seqs, starts)]
        ids = torch.zeros(len(seqs), max(lens), dtype=torch.long, device=dev)
        for b, (s, st) in enumerate(zip(seqs, starts)):
            ids[b, :lens[b]] = torch.tensor(s.prompt[st:], dtype=torch.long)
        # padding positions run past a row's prompt (overwritten before anything attends to them)
        positions = (torch.tensor(starts, device=dev)[:, None] + torch.arange(ids.shape[1], device=dev))
        positions = positions.clamp_max(self.context - 1)
        cache = self.cache.view(first, first + len(seqs))
        try:
            hidden = self.engine.forward(ids, positions, cache, absorb=False)  # [B, T, D]
            rows_b, at = torch.arange(len(seqs), device=dev), torch.tensor(lens, device=dev) - 1
            tokens = self._pick(seqs, self.engine.logits(hidden[rows_b, at]))
            for b, s in enumerate(seqs):
                if s.params.prompt_logprobs is not None:
                    record_prompt_logprobs(s, self.engine.logits(hidden[b, :lens[b] - 1]))
            if self.mtp:  # MTP entry i reads (h_i, t_{i+1}); the last prompt position pairs with the new token
                next_ids = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)
                next_ids[rows_b, at] = torch.tensor([max(t, 0) for t in tokens], device=dev)
                g = self.engine.mtp_forward(hidden, next_ids, positions, cache, absorb=False)
                self._propose(seqs, self.engine.logits(g[rows_b, at]))
        except Exception as e:  # the forward itself failed: these sequences end, nothing else is touched
            _fail(seqs, list(range(len(seqs))), "prefill", e)
            return
        for slot, (s, st, t) in enumerate(zip(seqs, starts, tokens), first):
            self.prefix.insert(s.prompt, self.cache.row(slot))
            s.length, s.cached_tokens = len(s.prompt), st
            self.rows.append(s)
            if s.finish_reason is None:
                s.last = t
                self.stats["new_tokens"] += s.add([t], self.eos)
        self.stats["prompt_tokens"] += sum(len(s.prompt) for s in seqs)
        self.stats["cached_tokens"] += sum(starts)
        self.stats["row_forwards"] += len(seqs)
        self.stats["prefill_s"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def step(self) -> None:
        """One forward for every running row: a plain decode step, or MTP verify + draft. Rows
        that finished must have left (``leave``) first."""
        if not self.rows:
            return
        t0 = time.perf_counter()
        try:
            (self._verify_step if self.mtp else self._decode_step)()
        except Exception as e:  # nothing to blame one row for: every running row fails
            _fail(self.rows, list(range(len(self.rows))), "decode", e)
        n = len(self.rows)
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += n
        self.stats["row_forwards"] += n
        self.stats["decode_s"] += time.perf_counter() - t0

    def _decode_step(self) -> None:
        """Feed every row its newest token at its own position; pick each row's next one."""
        rows, dev = self.rows, self.engine.device
        ids = torch.tensor([[s.last] for s in rows], device=dev)
        positions = torch.tensor([[s.length] for s in rows], device=dev)
        hidden = self.engine.decode(ids, positions, self.cache.view(0, len(rows)))
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
        rows, dev, n = self.rows, self.engine.device, len(self.rows)
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

    def _propose(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """MTP's logits [n, V] -> each row's draft and the distribution it came from (None if greedy)."""
        for idx, p, gen in _groups(seqs):
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
        """Take finished rows out (returned); the last running row moves into each freed slot."""
        done, i = [], 0
        while i < len(self.rows):
            if self.rows[i].finish_reason is None:
                i += 1
                continue
            done.append(self.rows[i])
            last = self.rows.pop()
            if i < len(self.rows):  # `last` was not the finished row: it moves into slot i
                self.cache.move(len(self.rows), i, last.length)
                self.rows[i] = last
        return done


class Engine:
    """The model's forwards and ``generate``/``stream`` over a ``Batch``; see the module docstring."""

    def __init__(self, model, tokenizer=None, compile: bool = False, prefix_cache_bytes: int = 0):
        """compile=True: the one-token decode step runs through torch.compile over the whole
        preallocated cache (static shapes; the first request pays the compilation).
        prefix_cache_bytes > 0: prompt prefixes are kept and reused across calls; call
        ``prefix.clear()`` after changing the weights."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.stats: dict = {}
        self._compiled_decode = torch.compile(self._decode_whole, dynamic=True) if compile else None

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, compile: bool = False,
                        prefix_cache_bytes: int = 0) -> "Engine":
        """An Engine over the checkpoint at `path` with the tokenizer saved next to it."""
        from ..hf.io import load_with_tokenizer
        model, tokenizer = load_with_tokenizer(path, dtype=dtype)
        return cls(model, tokenizer, compile=compile, prefix_cache_bytes=prefix_cache_bytes)

    # ------------------------------------------------------------------ sizes
    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def eos_ids(self) -> set[int]:
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_id", None) is not None:
            eos.add(self.tokenizer.eos_id)
        return eos

    def cache_bytes_per_token(self) -> int:
        """Main-model cache bytes per token: (kv_lora_rank + qk_rope_head_dim) x layers x element size.
        Speculative decoding adds the MTP module's own entries (one more layer's worth per depth)."""
        return self.config.cache_bytes_per_token(self.dtype.itemsize)

    def new_cache(self, batch_size: int, max_len: int, mtp_layers: int = 0) -> LatentCache:
        cfg = self.config
        return LatentCache(cfg.num_hidden_layers + mtp_layers, batch_size, max_len, cfg.latent_cache_width,
                           self.dtype, self.device)

    # ------------------------------------------------------------------ forwards
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                absorb: bool) -> torch.Tensor:
        """Main model over ids [B, T] at positions [B, T] -> normed final hidden [B, T, D]."""
        cache.prepare(positions)
        h = self.model.forward_hidden(ids, positions, _mask(positions, cache), cache, absorb)
        return self.model.model.norm(h)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """One token per row through the absorbed path (the compiled whole-cache step if enabled)."""
        if self._compiled_decode is None:
            return self.forward(ids, positions, cache, absorb=True)
        cache.prepare(positions, whole=True)
        return self._compiled_decode(ids, positions, cache)

    def _decode_whole(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """forward() for one token per row over all the cache's slots: the step torch.compile sees."""
        mask = attention_mask(positions, cache.max_len)
        return self.model.model.norm(self.model.forward_hidden(ids, positions, mask, cache, absorb=True))

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    cache: LatentCache, absorb: bool) -> torch.Tensor:
        """MTP module 1: (main hidden at i, token i+1) -> its normed output [B, T, D] predicting i+2."""
        layer = self.model.mtp_layers[0]
        cache.prepare(positions)
        emb = self.model.model.embed_tokens(next_ids)
        cos, sin = self.model.model.rotary_emb(positions, emb.dtype)
        return layer.shared_head.norm(layer(hidden, emb, cos, sin, _mask(positions, cache), cache, absorb))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    # ------------------------------------------------------------------ requests
    def _validate(self, prompts, max_new_tokens, params: SamplingParams, speculative) -> None:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
        for i, p in enumerate(prompts):
            check_prompt(p, max_new_tokens, self.config.max_position_embeddings, self.config.vocab_size,
                         what=f"prompts[{i}]")
        params.validate()
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative={speculative!r}: expected None or 'mtp'")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[list[int]] | None = None, speculative: str | None = None) -> list[Completion]:
        """Each prompt's new token ids and finish reason (prompt, EOS and stop sequence excluded):
        admit every prompt, step until all are done."""
        seqs, batch = self._start(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative)
        for _ in self._run(seqs, batch):
            pass
        return [Completion(s.out, s.finish_reason, s.cached_tokens) for s in seqs]

    def stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[list[int]] | None = None, speculative: str | None = None):
        """Like ``generate`` but yields, after every forward, each prompt's newly final tokens.

        Tokens that might begin a stop sequence are held back until they cannot. Greedy when
        temperature is 0; a seed makes sampling reproducible. speculative="mtp": the MTP module
        drafts one token that the main model verifies in the same forward as the next.
        """
        seqs, batch = self._start(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative)
        yield from self._run(seqs, batch)

    def _start(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative):
        """Validate a generate/stream call and admit its prompts into a batch of their own."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed,
                                stop_token_ids=[list(s) if isinstance(s, (list, tuple)) else s for s in stop or []])
        self._validate(prompts, max_new_tokens, params, speculative)
        generator = new_generator(seed, self.device) if temperature > 0 else None  # one stream for the batch
        seqs = [Sequence(p, params, generator=generator) for p in prompts]
        batch = Batch(self, len(seqs), max(len(p) for p in prompts) + max_new_tokens + 1, speculative)
        batch.admit(seqs)
        return seqs, batch

    def _run(self, seqs: list[Sequence], batch: Batch):
        """Step the batch until every sequence is done, yielding each one's new final tokens."""
        while True:
            failed = next((s for s in seqs if s.finish_reason == "error"), None)
            if failed is not None:
                raise RuntimeError(failed.error) from failed.exception
            self.stats = _rates(batch.stats)
            yield [s.take()[0] for s in seqs]
            batch.leave()
            if not batch.rows:
                return
            batch.step()


def _rates(stats: dict) -> dict:
    """A batch's counters plus tokens per forward and the MTP acceptance rate."""
    s = dict(stats)
    s["tokens_per_forward"] = s["new_tokens"] / max(s["row_forwards"], 1)
    s["acceptance_rate"] = s["accepted"] / s["drafted"] if s["drafted"] else None
    return s


def _mask(positions: torch.Tensor, cache: LatentCache) -> torch.Tensor | None:
    """The forward's mask, or None when every row is at the same contiguous positions and either
    one token is decoded or the keys start at 0: plain causal attention is then exact, and the
    layers skip building and applying a mask (prefill takes SDPA's causal kernel)."""
    start = cache.start
    if start is not None and (positions.shape[1] == 1 or start == 0):
        return None
    return attention_mask(positions, cache.attend_len)
