"""Inference: a latent KV cache, prefill + absorbed-MLA decode, sampling, MTP speculative decoding.

    engine = Engine(load_pretrained("out/model"), tokenizer=None)
    outs = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)           # greedy, list of new ids
    outs = engine.generate(prompts, 32, temperature=0.7, top_p=0.9, seed=0)  # sampled, reproducible
    outs = engine.generate(prompts, 32, speculative="mtp")                   # MTP drafts, same output
    for new in engine.stream(prompts, 32): ...                               # new ids per prompt, as made
    engine.stats  # tokens_per_forward, acceptance_rate, finish_reasons ...

The engine knows token ids only (the tokenizer, if given, is kept for callers). Its cache is
MLA's promise kept: per layer and token it stores the normalised latent c_KV and the rotary key
k^R, (kv_lora_rank + qk_rope_head_dim) numbers, and decoding attends in that latent space with
W_UK / W_UV absorbed (``MLA._attend_absorbed``), so a decoded token costs O(latent x context)
on top of the weights. Prefill uses the expanded path (SDPA over up-projected keys).

Batching: each row keeps its own positions 0..len-1. Prompts are right-padded for prefill and
every forward gets the mask key_pos <= query_pos. A forward writes its tokens' latents before it
attends, so a stale entry (padding, a rejected draft) at position p is always overwritten by
the row's real token p before any query at p or later can see it: no padding leaks, and a
speculative rollback is just setting the row's length back.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from .sampling import (draw, find_stop, greedy_accept, held_back, sample, sampling_probs,
                       speculative_accept, validate_sampling)


class LatentCache:
    """Preallocated latent cache: kv [layers, B, max_len, kv_lora_rank + qk_rope_head_dim].

    Before each forward the engine calls ``prepare(positions)``; each MLA layer then calls
    ``update(layer_id, latent)``, which writes the new tokens at their rows' own positions and
    returns the first ``attend_len`` entries of every row (the mask hides the rest).
    Layer ids >= num_hidden_layers are the MTP modules' (allocated only when drafting).
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, width: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.kv = torch.zeros(num_layers, batch_size, max_len, width, dtype=dtype, device=device)
        self.positions: torch.Tensor | None = None
        self.attend_len = 0
        self.whole = False  # attend over all max_len slots (static shapes for a compiled step)
        self._rows: torch.Tensor | None = None
        self._start: int | None = None

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    @property
    def start(self) -> int | None:
        """The first position of the prepared forward when all rows share its positions, else None."""
        return self._start

    def prepare(self, positions: torch.Tensor, whole: bool = False) -> None:
        """positions [B, T]: where the next forward's tokens go, row by row.

        whole=True: every forward sees all max_len slots (the mask hides the unwritten ones) and
        writes by index, so no shape or Python number changes from one step to the next.
        """
        B, T = positions.shape
        self.positions = positions
        self.attend_len = int(positions.max()) + 1
        if self.attend_len > self.max_len:
            raise ValueError(f"position {self.attend_len - 1} is beyond the cache's {self.max_len} slots")
        self.whole = whole
        self._rows = torch.arange(B, device=positions.device)[:, None]
        if whole:
            self.attend_len, self._start = self.max_len, None
            return
        first = positions[:, :1]
        # all rows at the same contiguous positions (prefill, batch 1): a slice write, no index
        same = bool((positions == first[:1] + torch.arange(T, device=positions.device)).all())
        self._start = int(first[0, 0]) if same else None

    def update(self, layer_id: int, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, T, R+dr] -> the row's keys [B, attend_len, R+dr]."""
        kv = self.kv[layer_id]
        if self._start is not None:
            kv[:, self._start:self._start + latent.shape[1]] = latent
        else:
            kv[self._rows, self.positions] = latent
        return kv if self.whole else kv[:, :self.attend_len]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished requests leave the batch)."""
        self.kv = self.kv[:, rows]

    def view(self, start: int, stop: int) -> "LatentCache":
        """A cache over batch rows start..stop-1 that shares this one's storage: forwards through
        it write into these rows (a server prefills one slot, or decodes its first n slots)."""
        part = copy.copy(self)
        part.kv = self.kv[:, start:stop]
        return part


def attention_mask(positions: torch.Tensor, attend_len: int) -> torch.Tensor:
    """bool [B, 1, T, S]: a query at position p sees the keys at positions 0..p of its own row."""
    keys = torch.arange(attend_len, device=positions.device)
    return (keys <= positions[..., None]).unsqueeze(1)


def _mask(positions: torch.Tensor, cache: LatentCache) -> torch.Tensor | None:
    """The forward's mask, or None when every row is at the same contiguous positions and either
    one token is decoded or the keys start at 0: plain causal attention is then exact, and the
    layers skip building and applying a mask (prefill takes SDPA's causal kernel)."""
    start = cache.start
    if start is not None and (positions.shape[1] == 1 or start == 0):
        return None
    return attention_mask(positions, cache.attend_len)


@dataclass
class _Rows:
    """The rows still decoding; finished rows are dropped from every tensor (and the cache)."""
    index: list[int]  # which prompt each row is
    lengths: torch.Tensor  # [b] tokens of the row already in the main cache
    last: torch.Tensor  # [b] newest token, made but not yet fed to the model
    draft: torch.Tensor | None = None  # [b] MTP's guess for the token after `last`
    q: torch.Tensor | None = None  # [b, V] the distribution the draft was drawn from (sampling only)

    def select(self, keep: list[int]) -> "_Rows":
        t = torch.tensor(keep, dtype=torch.long)
        pick = (lambda x: None if x is None else x[t])
        return _Rows([self.index[i] for i in keep], self.lengths[t], self.last[t], pick(self.draft), pick(self.q))


class Engine:
    """Prefill + decode for a ``Transformer``; see the module docstring for the API."""

    def __init__(self, model, tokenizer=None, compile: bool = False):
        """compile=True: the one-token decode step runs through torch.compile over the whole
        preallocated cache (static shapes; the first request pays the compilation)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.stats: dict = {}
        self._compiled_decode = torch.compile(self._decode_whole, dynamic=True) if compile else None

    # ------------------------------------------------------------------ sizes
    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def cache_bytes_per_token(self) -> int:
        """Main-model cache bytes per token: (kv_lora_rank + qk_rope_head_dim) x layers x element size.

        Speculative decoding adds the MTP module's own entries (one more layer's worth per depth).
        """
        cfg = self.config
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * self.dtype.itemsize

    def new_cache(self, batch_size: int, max_len: int, mtp_layers: int = 0) -> LatentCache:
        cfg = self.config
        return LatentCache(cfg.num_hidden_layers + mtp_layers, batch_size, max_len,
                           cfg.kv_lora_rank + cfg.qk_rope_head_dim, self.dtype, self.device)

    # ------------------------------------------------------------------ forwards
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                absorb: bool) -> torch.Tensor:
        """Main model over ids [B, T] at positions [B, T] -> normed final hidden [B, T, D]."""
        cache.prepare(positions)
        h = self.model.forward_hidden(ids, positions, _mask(positions, cache), cache, absorb)
        return self.model.model.norm(h)

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
    def _validate(self, prompts, max_new_tokens, temperature, top_k, top_p, stop, speculative):
        cfg = self.config
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
            if not all(isinstance(t, int) and 0 <= t < cfg.vocab_size for t in p):
                raise ValueError(f"prompts[{i}] has a token id outside 0..{cfg.vocab_size - 1}")
            if len(p) + max_new_tokens > cfg.max_position_embeddings:
                raise ValueError(f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens={max_new_tokens} "
                                 f"exceed the model's context of {cfg.max_position_embeddings}")
        validate_sampling(temperature, top_k, top_p)
        for s in stop or []:
            if not isinstance(s, (list, tuple)) or not s or not all(isinstance(t, int) for t in s):
                raise ValueError(f"stop={stop!r}: each stop sequence must be a non-empty list of token ids")
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative={speculative!r}: expected None or 'mtp'")
        if speculative == "mtp" and not self.model.mtp_layers:
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[list[int]] | None = None, speculative: str | None = None) -> list[list[int]]:
        """New token ids for each prompt (prompt, EOS and stop sequence excluded)."""
        outs: list[list[int]] = [[] for _ in prompts]
        for new in self.stream(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative):
            for out, toks in zip(outs, new):
                out.extend(toks)
        return outs

    def stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[list[int]] | None = None, speculative: str | None = None):
        """Like ``generate`` but yields, after every forward, each prompt's newly final tokens.

        Tokens that might begin a stop sequence are held back until they cannot. Greedy when
        temperature is 0; a seed makes sampling reproducible. speculative="mtp": the MTP module
        drafts one token that the main model verifies in the same forward as the next.
        """
        self._validate(prompts, max_new_tokens, temperature, top_k, top_p, stop, speculative)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        sampler = _Sampler(temperature, top_k, top_p, generator)
        stops = [list(s) for s in stop or []]
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_id", None) is not None:
            eos.add(self.tokenizer.eos_id)
        mtp = speculative == "mtp"
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        emitted = [0] * B
        self.stats = dict(new_tokens=0, row_forwards=0, drafted=0, accepted=0, prefill_s=0.0, decode_s=0.0,
                          finish_reasons=[None] * B, tokens_per_forward=None, acceptance_rate=None)

        t0 = time.perf_counter()
        cache = self.new_cache(B, max(len(p) for p in prompts) + max_new_tokens + 1, int(mtp))
        rows, made = self._prefill(prompts, cache, sampler, mtp)
        self.stats["prefill_s"] += time.perf_counter() - t0
        while True:
            new = [[] for _ in range(B)]
            keep = []
            for r, (i, toks) in enumerate(zip(rows.index, made)):
                toks = toks[:max_new_tokens - len(out[i])]
                self.stats["new_tokens"] += len(toks)
                start = len(out[i])
                out[i].extend(toks)
                end = find_stop(out[i], start, stops, eos)
                if end is not None:
                    del out[i][end:]
                    self.stats["finish_reasons"][i] = "stop"
                elif len(out[i]) >= max_new_tokens:
                    self.stats["finish_reasons"][i] = "length"
                else:
                    keep.append(r)
                ready = len(out[i]) - (held_back(out[i], stops) if r in keep[-1:] else 0)
                new[i], emitted[i] = out[i][emitted[i]:ready], ready
            self._update_rates()
            yield new
            if not keep:
                return
            if len(keep) < len(rows.index):
                rows = rows.select(keep)
                cache.select(torch.tensor(keep, dtype=torch.long, device=self.device))
            t0 = time.perf_counter()
            made = self._speculative_step(rows, cache, sampler) if mtp else self._decode_step(rows, cache, sampler)
            self.stats["decode_s"] += time.perf_counter() - t0

    def _update_rates(self):
        s = self.stats
        s["tokens_per_forward"] = s["new_tokens"] / max(s["row_forwards"], 1)
        s["acceptance_rate"] = s["accepted"] / s["drafted"] if s["drafted"] else None

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def _prefill(self, prompts, cache: LatentCache, sampler: "_Sampler", mtp: bool):
        """Right-padded prompts through the expanded path; samples each row's first new token."""
        B, T = len(prompts), max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        positions = torch.arange(T, device=self.device).expand(B, T)
        hidden = self.forward(ids, positions, cache, absorb=False)  # [B, T, D]
        rows_b = torch.arange(B, device=self.device)
        last = sampler.pick(self.logits(hidden[rows_b, lengths - 1]))  # [B]
        self.stats["row_forwards"] += B
        rows = _Rows(list(range(B)), lengths, last)
        if mtp:
            # MTP entry i reads (h_i, t_{i+1}); the last prompt position pairs with the new token
            next_ids = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)
            next_ids[rows_b, lengths - 1] = last
            g = self.mtp_forward(hidden, next_ids, positions, cache, absorb=False)
            rows.draft, rows.q = sampler.propose(self.logits(g[rows_b, lengths - 1]))
        return rows, [[t] for t in last.tolist()]

    @torch.inference_mode()
    def _decode_step(self, rows: _Rows, cache: LatentCache, sampler: "_Sampler") -> list[list[int]]:
        """One token per row: feed `last` at position `length`, attend in latent space."""
        ids, positions = rows.last[:, None], rows.lengths[:, None]
        if self._compiled_decode is not None:
            cache.prepare(positions, whole=True)
            hidden = self._compiled_decode(ids, positions, cache)
        else:
            hidden = self.forward(ids, positions, cache, absorb=True)
        rows.last = sampler.pick(self.logits(hidden[:, 0]))
        rows.lengths = rows.lengths + 1
        self.stats["row_forwards"] += len(rows.index)
        return [[t] for t in rows.last.tolist()]

    @torch.inference_mode()
    def _speculative_step(self, rows: _Rows, cache: LatentCache, sampler: "_Sampler") -> list[list[int]]:
        """Verify MTP's draft and make the next token in one forward, then draft again.

        The main model reads [last, draft] at positions n, n+1. If the draft is accepted both are
        kept, plus the token sampled after it; else the draft's cache entry at n+1 is stale and the
        row's length simply stops at n+1 (it is overwritten next step). The MTP module then reads
        (h_n, t_{n+1}) and, if accepted, (h_{n+1}, t_{n+2}), and drafts from the last of them.
        """
        n = rows.lengths
        steps = torch.arange(2, device=self.device)
        positions = n[:, None] + steps  # [b, 2]
        hidden = self.forward(torch.stack((rows.last, rows.draft), dim=1), positions, cache, absorb=True)
        accepted, nxt = sampler.verify(self.logits(hidden), rows.draft, rows.q)
        self.stats["row_forwards"] += len(rows.index)
        self.stats["drafted"] += len(rows.index)
        self.stats["accepted"] += int(accepted.sum())

        T = int(accepted.max()) + 1  # 1 when every row rejected: the MTP module reads one token
        next_ids = torch.stack((torch.where(accepted > 0, rows.draft, nxt), nxt), dim=1)[:, :T]
        g = self.mtp_forward(hidden[:, :T], next_ids, positions[:, :T], cache, absorb=True)
        rows.draft, rows.q = sampler.propose(self.logits(g[torch.arange(len(n)), accepted]))
        made = [[d, x] if a else [x] for d, x, a in zip(next_ids[:, 0].tolist(), nxt.tolist(), accepted.tolist())]
        rows.last, rows.lengths = nxt, n + 1 + accepted
        return made


class _Sampler:
    """The request's sampling settings, applied the same way to every forward."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)

    def propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft and the distribution it came from (None when greedy)."""
        if self.temperature <= 0:
            return logits.argmax(-1), None
        q = sampling_probs(logits, self.temperature, self.top_k, self.top_p)
        return draw(q, self.generator), q

    def verify(self, logits: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None):
        """logits [b, 2, V] at [last, draft] -> (accepted [b] in {0, 1}, next token [b])."""
        if self.temperature <= 0:
            return greedy_accept(logits, draft[:, None])
        p = sampling_probs(logits, self.temperature, self.top_k, self.top_p)
        return speculative_accept(p, q[:, None], draft[:, None], self.generator)
