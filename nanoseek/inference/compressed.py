"""DeepSeek-V4's inference cache: a sliding window and compressed entries instead of a per-token latent.

    cache = CompressedCache(cfg, slots=4, max_len=65536, dtype=torch.bfloat16)       # pages for 4 x 65536
    cache = CompressedCache.for_budget(2 << 30, cfg, slots=16, max_len=1 << 20, dtype=torch.bfloat16)
    cache.reserve(slot, length); cache.release(slot)   # pages, as the batch needs them
    cache.prepare(positions)                     # the engine, before each forward (rows contiguous, unpadded)
    keys, key_pos = cache.window(layer_id, kv)   # each V4 attention layer (v4.Attention)
    entries = cache.entries(layer_id, raw, m, make_entries)

Per slot and layer it holds (``v4.py`` says what each is):
    window    the last window_size tokens' shared key/value (a ring: position p at p mod its length)
    pending   the compressor's projections [C ; Z] of the tokens whose window has not closed yet, and for
              CSA the window before it (its first series overlaps the next entry): a ring as well
    entries   every closed window's compressed entry, at its window index (CSA: [K ; K^I], the
              lightning indexer's key beside the attention's), in pages of page_tokens positions
              drawn from one pool, so a sequence holds pages only for the context it has
so memory grows by sum over layers of (entry width / m) numbers per token, plus a fixed window and
pending part per slot (``ModelConfig.cache_bytes_per_token``, ``fixed_bytes``). For V4-Flash in bf16 that is 6.9 KB per
token (and 14 MB per sequence) against DeepSeek-V3's 70 KB of MLA latents per token.

Everything is written at absolute positions, so a row's state is a function of its tokens: a
rejected speculative token's writes are overwritten by the real one before anything reads them,
as in ``cache.LatentCache``; the rings keep SLACK positions beyond what the next forward reads for
that. The engine feeds each row its own contiguous positions with no padding (``unpadded``): a
padding token would close windows and overwrite ring entries that are still needed.
Prefix caching is not offered (a prefix's state includes the rings, not just whole blocks).
"""

from __future__ import annotations

import copy
import heapq
import math

import torch

SLACK = 16  # ring positions beyond the history a forward reads: the most tokens a decode step writes


class CompressedCache:
    """DeepSeek-V4 state for `slots` sequences: fixed rings per slot, compressed entries in pages.

    A page covers `page_tokens` positions of one sequence (a multiple of every compression rate):
    in each compressed layer's pool it holds that stretch's page_tokens / m entries. Pages come from
    one pool of `num_pages` (default: enough for every slot at max_len; ``for_budget`` sizes it by
    memory), a slot's block table lists its pages in position order, and ``reserve`` takes pages
    before a forward writes (False when the pool is short: the batch then preempts)."""

    unpadded = True  # rows are contiguous and unpadded; the model masks by position itself
    prefix_cache = False  # a prefix's state includes the rings, not only whole blocks

    def __init__(self, cfg, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 num_pages: int | None = None, page_tokens: int | None = None, mtp_layers: int = 0):
        """mtp_layers: window rings for that many MTP modules too (layer ids num_hidden_layers..; window only)."""
        self.cfg, self.max_len = cfg, max_len
        layers, W, dh = cfg.num_hidden_layers + mtp_layers, cfg.window_size, cfg.head_dim
        rates = sorted({m for m in map(cfg.compress_ratio, range(cfg.num_hidden_layers)) if m})
        self.page_tokens = P = page_tokens or math.lcm(*rates, 1)
        if any(P % m for m in rates):
            raise ValueError(f"page_tokens={P} must be a multiple of every compression rate {rates}")
        self.num_pages = -(-max_len // P) * slots if num_pages is None else num_pages
        if self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages}: the cache needs at least one page")
        self.window_len = W - 1 + SLACK
        self.win = torch.zeros(layers, slots, self.window_len, dh, dtype=dtype, device=device)
        self.pending: dict[int, torch.Tensor] = {}
        # layer -> its pools [(num_pages + 1) * P / m, width] (last page: scratch): HCA [K]; CSA [K] and [K^I]
        self.comp: dict[int, list[torch.Tensor]] = {}
        for i in range(cfg.num_hidden_layers):
            m = cfg.compress_ratio(i)
            if m:
                widths, raw, history = entry_widths(cfg, m)
                self.pending[i] = torch.zeros(slots, history + SLACK, raw, dtype=dtype, device=device)
                self.comp[i] = [torch.zeros((self.num_pages + 1) * (P // m), w, dtype=dtype, device=device)
                                for w in widths]
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.free_pages = list(range(self.num_pages))  # a heap: lowest id first
        self.slots = list(range(slots))
        self.starts: list[int] = []
        self.T = 0
        self.positions: torch.Tensor | None = None
        self.attend_len, self._start = 0, None
        self._rows: dict[int, torch.Tensor] = {}

    @classmethod
    def for_budget(cls, budget_bytes: int, cfg, slots: int, max_len: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu", page_tokens: int | None = None,
                   mtp_layers: int = 0) -> "CompressedCache":
        """As many pages as `budget_bytes` holds after every slot's fixed part."""
        probe = cls(cfg, 1, 1, dtype, "meta", num_pages=1, page_tokens=page_tokens, mtp_layers=mtp_layers)
        ring = mtp_layers * probe.win.shape[2] * probe.win.shape[3] * dtype.itemsize
        fixed = slots * (fixed_bytes(cfg, dtype.itemsize) + ring) + probe.page_bytes  # + the scratch page
        pages = (budget_bytes - fixed) // probe.page_bytes
        if pages < 1:
            raise ValueError(f"a KV-cache budget of {budget_bytes} bytes holds {slots} sequences' windows "
                             f"({fixed} bytes) but no page of {probe.page_bytes} bytes")
        return cls(cfg, slots, max_len, dtype, device, num_pages=pages, page_tokens=page_tokens, mtp_layers=mtp_layers)

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_pages * self.page_tokens

    @property
    def free_tokens(self) -> int:
        return len(self.free_pages) * self.page_tokens

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes over every compressed layer."""
        return sum((self.page_tokens // self.cfg.compress_ratio(i)) * t.shape[1] * t.element_size()
                   for i, pools in self.comp.items() for t in pools)

    @property
    def start(self) -> int | None:
        return self._start

    @property
    def nbytes(self) -> int:
        pools = [t for parts in self.comp.values() for t in parts]
        return sum(t.numel() * t.element_size() for t in (self.win, *self.pending.values(), *pools))

    # ------------------------------------------------------------------ slots and pages
    def view(self, start: int, stop: int) -> "CompressedCache":
        return self.subset(range(start, stop))

    def subset(self, slots) -> "CompressedCache":
        """A cache whose forwards address these slots, in this order (same storage and pages)."""
        part = copy.copy(self)
        part.slots = [self.slots[s] for s in slots]
        return part

    def reserve(self, slot: int, length: int, write_from: int = 0) -> bool:
        """Pages for positions < length; False, changing nothing, when the pool is short."""
        if length > self.max_len:
            return False
        table = self.tables[slot]
        missing = max(-(-length // self.page_tokens) - len(table), 0)
        if missing > len(self.free_pages):
            return False
        table.extend(heapq.heappop(self.free_pages) for _ in range(missing))
        return True

    def release(self, slot: int) -> None:
        for page in self.tables[slot]:
            heapq.heappush(self.free_pages, page)
        self.tables[slot] = []

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot src's sequence moves to slot dst (its pages go with it; its rings are copied)."""
        self.release(dst)
        self.tables[dst], self.tables[src] = self.tables[src], []
        self.win[:, dst] = self.win[:, src]
        for ring in self.pending.values():
            ring[dst] = ring[src]

    def fork(self, src: int, dst: int, length: int) -> None:
        """Slot dst starts as a copy of src's first `length` positions (its own pages)."""
        if not self.reserve(dst, length):
            raise ValueError(f"no free pages to copy a {length}-token sequence")
        P = self.page_tokens
        for i, pools in self.comp.items():
            per = P // self.cfg.compress_ratio(i)
            for pool in pools:
                for a, b in zip(self.tables[src], self.tables[dst]):
                    pool[b * per:(b + 1) * per] = pool[a * per:(a + 1) * per]
        self.win[:, dst] = self.win[:, src]
        for ring in self.pending.values():
            ring[dst] = ring[src]

    def snapshot(self, slot: int, index: int, block: int):
        raise ValueError("prefix caching is not available with DeepSeek-V4's compressed cache")

    def restore(self, slot: int, blocks: list) -> None:
        raise ValueError("prefix caching is not available with DeepSeek-V4's compressed cache")

    # ------------------------------------------------------------------ forwards
    def prepare(self, positions: torch.Tensor, whole: bool = False) -> None:
        """positions [B, T]: each row's next T positions, contiguous (the engine never pads V4 rows)."""
        if whole:
            raise ValueError("DeepSeek-V4's cache has no whole-cache compiled step (Engine(compile=True))")
        B, T = positions.shape
        if T > 1 and not bool((positions == positions[:, :1] + torch.arange(T, device=positions.device)).all()):
            raise ValueError("DeepSeek-V4's cache needs each row's positions contiguous (no padding)")
        self.positions, self.T = positions, T
        self.starts = positions[:, 0].tolist()
        self.attend_len = int(positions.max()) + 1
        if self.attend_len > self.max_len:
            raise ValueError(f"position {self.attend_len - 1} is beyond the cache's {self.max_len} positions")
        self._start = self.starts[0] if len(set(self.starts)) == 1 else None
        self._rows = {}

    def _ring_write(self, ring: torch.Tensor, data: torch.Tensor) -> None:
        """ring [slots, R, c] (a layer's): data [B, T, c] at each row's positions start.. (the last R of them)."""
        R, T = ring.shape[1], data.shape[1]
        keep = min(T, R)
        dev = ring.device
        pos = torch.tensor(self.starts, device=dev)[:, None] + torch.arange(T - keep, T, device=dev)
        ring[torch.tensor(self.slots, device=dev)[:, None], pos % R] = data[:, T - keep:]

    def _entry_rows(self, m: int, n: int) -> torch.Tensor:
        """[B, n]: where entries 0..n-1 of each row sit in a rate-m pool (the scratch page where a row has none)."""
        if m not in self._rows:
            per = self.page_tokens // m
            w = torch.arange(n)
            pages = torch.full((len(self.slots), -(-n // per) if n else 0), self.num_pages, dtype=torch.long)
            for b, slot in enumerate(self.slots):
                t = self.tables[slot][:pages.shape[1]]
                pages[b, :len(t)] = torch.tensor(t, dtype=torch.long)
            self._rows[m] = (pages[:, w // per] * per + w % per).to(self.win.device)
        return self._rows[m]

    def window(self, layer_id: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv [B, T, dh] of this forward -> (keys [B, W-1+T, dh], their positions [B, W-1+T], -1 for none):
        the window_size - 1 tokens before each row's first position, then kv; kv is written."""
        ring = self.win[layer_id]
        dev, R, H = ring.device, ring.shape[1], self.cfg.window_size - 1
        starts = torch.tensor(self.starts, device=dev)[:, None]
        pos = starts - H + torch.arange(H, device=dev)  # [B, W-1]
        hist = ring[torch.tensor(self.slots, device=dev)[:, None], pos % R]
        self._ring_write(ring, kv)
        keys = torch.cat((hist, kv), dim=1)
        return keys, torch.cat((pos.clamp_min(-1), self.positions), dim=1)

    def entries(self, layer_id: int, raw: torch.Tensor, m: int, make_entries) -> tuple[torch.Tensor, ...]:
        """raw [B, T, ·]: this forward's compressor projections. Closes every window whose last token
        is here (``make_entries(raw run [1, L, ·], its first position)`` -> each part's entries
        [1, L // m, width], over the pending projections and these), stores the new entries and the
        projections, and returns every row's entries so far, per part [B, N, width] (N: the most any
        row has; a row's later ones are stale). Parts: HCA's keys; CSA's keys and indexer keys."""
        ring, pools = self.pending[layer_id], self.comp[layer_id]
        R, back = ring.shape[1], m if m == 4 else 0  # CSA also reads the window before (overlap)
        n = max((s + self.T) // m for s in self.starts)
        rows = self._entry_rows(m, n)
        for b, (slot, s) in enumerate(zip(self.slots, self.starts)):
            first, last = s // m, (s + self.T) // m
            if last <= first:
                continue
            seg = max(0, first * m - back)
            held = torch.arange(seg, s, device=ring.device) % R
            run = torch.cat((ring[slot, held], raw[b]), dim=0)[None]
            for pool, new in zip(pools, make_entries(run, seg)):
                pool[rows[b, first:last]] = new[0, first - seg // m:last - seg // m]
        self._ring_write(ring, raw)
        start = self._consecutive(m, n)
        if start is not None:  # a lone row on consecutive pages: a view, no copy of every entry
            return tuple(pool[start:start + n][None] for pool in pools)
        return tuple(pool[rows] for pool in pools)

    def _consecutive(self, m: int, n: int) -> int | None:
        """The pool row where a lone row's entries 0..n-1 start when its pages are consecutive."""
        if len(self.slots) != 1:
            return None
        per = self.page_tokens // m
        table = self.tables[self.slots[0]][:-(-n // per)] if n else []
        if table != list(range(table[0], table[0] + len(table))) if table else True:
            return None
        return table[0] * per


def entry_widths(cfg, m: int) -> tuple[tuple[int, ...], int, int]:
    """A compressed layer's (entry widths per part, pending projection width, pending positions read
    back): HCA a key of head_dim from [C ; Z] of head_dim each, the current window; CSA a key and an
    indexer key (kept apart: the indexer scans its keys alone) from two series each, the current
    window and the one before."""
    widths = cfg.v4_entry_widths(m)
    if m == 4:  # [C ; Z] of two series each
        return widths, 4 * sum(widths), 2 * m
    return widths, 2 * widths[0], m


def fixed_bytes(cfg, itemsize: int) -> int:
    """Bytes per slot whatever the context: every layer's window ring and pending projections."""
    total = cfg.num_hidden_layers * (cfg.window_size - 1 + SLACK) * cfg.head_dim
    for m in map(cfg.compress_ratio, range(cfg.num_hidden_layers)):
        if m:
            _, raw, history = entry_widths(cfg, m)
            total += (history + SLACK) * raw
    return total * itemsize
