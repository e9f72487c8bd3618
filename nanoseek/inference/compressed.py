"""DeepSeek-V4's inference cache: a sliding window and compressed entries instead of a per-token latent.

    cache = CompressedCache(cfg, slots=4, max_len=65536, dtype=torch.bfloat16)
    cache.prepare(positions)                     # the engine, before each forward (rows contiguous, unpadded)
    keys, key_pos = cache.window(layer_id, kv)   # each V4 attention layer (v4.Attention)
    entries = cache.entries(layer_id, raw, m, make_entries)

Per slot and layer it holds (``v4.py`` says what each is):
    window    the last window_size tokens' shared key/value (a ring: position p at p mod its length)
    pending   the compressor's projections [C ; Z] of the tokens whose window has not closed yet, and for
              CSA the window before it (its first series overlaps the next entry): a ring as well
    entries   every closed window's compressed entry, at its window index (CSA: [K ; K^I], the
              lightning indexer's key beside the attention's)
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

import torch

SLACK = 16  # ring positions beyond the history a forward reads: the most tokens a decode step writes


class CompressedCache:
    """Slots of DeepSeek-V4 state sized for `max_len` tokens each; see the module docstring."""

    unpadded = True  # rows are contiguous and unpadded; the model masks by position itself

    def __init__(self, cfg, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.cfg, self.max_len = cfg, max_len
        layers, W, dh = cfg.num_hidden_layers, cfg.window_size, cfg.head_dim
        self.window_len = W - 1 + SLACK
        self.win = torch.zeros(layers, slots, self.window_len, dh, dtype=dtype, device=device)
        self.pending: dict[int, torch.Tensor] = {}
        self.comp: dict[int, torch.Tensor] = {}
        for i in range(layers):
            m = cfg.compress_ratio(i)
            if not m:
                continue
            width, raw, history = entry_widths(cfg, m)
            self.pending[i] = torch.zeros(slots, history + SLACK, raw, dtype=dtype, device=device)
            self.comp[i] = torch.zeros(slots, max_len // m + 1, width, dtype=dtype, device=device)
        self.slots = list(range(slots))
        self.starts: list[int] = []
        self.T = 0
        self.positions: torch.Tensor | None = None
        self.attend_len, self._start = 0, None

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        return self.max_len

    @property
    def start(self) -> int | None:
        return self._start

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.win, *self.pending.values(), *self.comp.values()))

    # ------------------------------------------------------------------ slots
    def view(self, start: int, stop: int) -> "CompressedCache":
        return self.subset(range(start, stop))

    def subset(self, slots) -> "CompressedCache":
        """A cache whose forwards address these slots, in this order (same storage)."""
        part = copy.copy(self)
        part.slots = [self.slots[s] for s in slots]
        return part

    def _tensors(self):
        yield self.win.transpose(0, 1)  # [slots, layers, ...]
        yield from self.pending.values()
        yield from self.comp.values()

    def move(self, src: int, dst: int, length: int) -> None:
        for t in self._tensors():
            t[dst] = t[src]

    def fork(self, src: int, dst: int, length: int) -> None:
        self.move(src, dst, length)

    def reserve(self, slot: int, length: int, write_from: int = 0) -> bool:
        return length <= self.max_len

    def release(self, slot: int) -> None:
        pass

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

    def _ring_write(self, ring: torch.Tensor, data: torch.Tensor) -> None:
        """ring [slots, R, c] (a layer's): data [B, T, c] at each row's positions start.. (the last R of them)."""
        R, T = ring.shape[1], data.shape[1]
        keep = min(T, R)
        dev = ring.device
        pos = torch.tensor(self.starts, device=dev)[:, None] + torch.arange(T - keep, T, device=dev)
        ring[torch.tensor(self.slots, device=dev)[:, None], pos % R] = data[:, T - keep:]

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

    def entries(self, layer_id: int, raw: torch.Tensor, m: int, make_entries) -> torch.Tensor:
        """raw [B, T, ·]: this forward's compressor projections. Closes every window whose last token
        is here (``make_entries(raw run [1, L, ·], its first position) -> [1, L // m, width]`` over the
        pending projections and these), stores the new entries and the projections, and returns every
        row's entries so far [B, N, width] (N: the most any row has; a row's later ones are stale)."""
        ring, comp = self.pending[layer_id], self.comp[layer_id]
        R, back = ring.shape[1], m if m == 4 else 0  # CSA also reads the window before (overlap)
        for b, (slot, s) in enumerate(zip(self.slots, self.starts)):
            first, last = s // m, (s + self.T) // m
            if last <= first:
                continue
            seg = max(0, first * m - back)
            held = torch.arange(seg, s, device=ring.device) % R
            run = torch.cat((ring[slot, held], raw[b]), dim=0)[None]
            new = make_entries(run, seg)[0, first - seg // m:last - seg // m]
            comp[slot, first:last] = new
        self._ring_write(ring, raw)
        n = max((s + self.T) // m for s in self.starts)
        return comp[torch.tensor(self.slots, device=comp.device), :n]


def entry_widths(cfg, m: int) -> tuple[int, int, int]:
    """A compressed layer's (entry width, pending projection width, pending positions read back):
    HCA an entry of head_dim from [C ; Z] of head_dim each, the current window; CSA [K ; K^I] from two
    series each, the current window and the one before."""
    dh, di = cfg.head_dim, cfg.index_head_dim
    if m == 4:
        return cfg.v4_entry_width(m), 4 * dh + 4 * di, 2 * m
    return cfg.v4_entry_width(m), 2 * dh, m


def fixed_bytes(cfg, itemsize: int) -> int:
    """Bytes per slot whatever the context: every layer's window ring and pending projections."""
    total = cfg.num_hidden_layers * (cfg.window_size - 1 + SLACK) * cfg.head_dim
    for m in map(cfg.compress_ratio, range(cfg.num_hidden_layers)):
        if m:
            _, raw, history = entry_widths(cfg, m)
            total += (history + SLACK) * raw
    return total * itemsize
