"""The inference caches: MLA's latent cache in request slots, and the prefix cache of prompt latents.

    cache = LatentCache(num_layers, slots, max_len, kv_lora_rank + qk_rope_head_dim, dtype)
    cache.prepare(positions); kv = cache.update(layer_id, latent)   # what each MLA layer calls
    cache.move(src, dst, length)                                    # compaction: a row changes slot
    prefix = PrefixCache(max_bytes=256 << 20, block=16)
    latents = prefix.lookup(prompt, limit); prefix.insert(prompt, cache.row(slot))

The cache is MLA's promise kept: per layer and token it stores the normalised latent c_KV and the
rotary key k^R, (kv_lora_rank + qk_rope_head_dim) numbers (``ModelConfig.cache_width``);
decoding attends in that latent space with W_UK / W_UV absorbed. Each batch row keeps its own
positions 0..len-1, and every forward writes its tokens' latents before it attends, so a stale
entry (padding, a rejected draft) at position p is overwritten by the row's real token p before
any query at p or later can see it: a speculative rollback is just setting the row's length back.
Rows move and prefixes are restored only through the methods here, never by writing ``kv``.
DeepSeek-V3.2's sparse attention adds its lightning indexer's key k^I to the vector: MLA writes
[c_KV ; k^R ; k^I] and splits what ``update`` returns (``indexer.py``), so both stay in step through
every move, fork, page copy and prefix block with nothing here knowing.

The same caches hold grouped-query attention's keys and values (Llama, Qwen2, DeepSeek-LLM/Coder,
DeepSeekMoE-16B): there the vector per layer and token is [k_1..k_G ; v_1..v_G] of the G key/value
heads, 2·G·head_dim numbers (``ModelConfig.cache_width``), written and read by the same
``update(layer_id, vector)``; slots, pages, copy-on-write and prefix blocks work unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
from collections import OrderedDict

import torch


class LatentCache:
    """Preallocated latent cache: kv [layers, B, max_len, kv_lora_rank + qk_rope_head_dim].

    Before each forward the engine calls ``prepare(positions)``; each MLA layer then calls
    ``update(layer_id, latent)``, which writes the new tokens at their rows' own positions and
    returns the first ``attend_len`` entries of every row (the mask hides the rest).
    Layer ids >= num_hidden_layers are the MTP modules' (allocated only when drafting).
    """

    unpadded = False  # rows may be right-padded: the engine passes the model a mask
    prefix_cache = True  # whole blocks of a prompt can be kept and restored

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
    def capacity(self) -> int:
        """Tokens one slot holds."""
        return self.max_len

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

    def view(self, start: int, stop: int) -> "LatentCache":
        """A cache over batch rows start..stop-1 that shares this one's storage: forwards through
        it write into these rows (a server prefills one slot, or decodes its first n slots)."""
        part = copy.copy(self)
        part.kv = self.kv[:, start:stop]
        return part

    def row(self, slot: int) -> torch.Tensor:
        """Every layer's entries of one slot: [layers, max_len, width] (a view)."""
        return self.kv[:, slot]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` entries of slot `src` into slot `dst` (a row changes slot)."""
        self.kv[:, dst, :length] = self.kv[:, src, :length]

    def fork(self, src: int, dst: int, length: int) -> None:
        """Slot `dst` starts as a copy of the first `length` entries of `src` (same prompt, n choices)."""
        self.move(src, dst, length)

    # every slot owns max_len positions from the start: nothing to reserve or give back
    def reserve(self, slot: int, length: int, write_from: int = 0) -> bool:
        return length <= self.max_len

    def release(self, slot: int) -> None:
        pass

    def snapshot(self, slot: int, index: int, block: int) -> torch.Tensor:
        """A copy of block `index` (positions index*block ..) of `slot`: what the prefix cache keeps."""
        return self.kv[:, slot, index * block:(index + 1) * block].clone()

    def restore(self, slot: int, blocks: list[torch.Tensor]) -> None:
        """Write cached prefix blocks [layers', block, width] at the start of `slot`. A prefix kept by
        a cache with fewer layers (no MTP module) fills only those layers; the MTP layer's entries of
        the prefix then stay stale, which changes how often drafts are accepted, never the output
        (verification decides every token)."""
        latents = torch.cat(blocks, dim=1)
        n = min(latents.shape[0], self.kv.shape[0])
        self.kv[:n, slot, :latents.shape[1]] = latents[:n]


class PageRef:
    """A page of a ``PagedLatentCache`` held by the prefix cache; release() lets go of it."""

    def __init__(self, cache: "PagedLatentCache", page: int):
        self.cache, self.page, self.nbytes = cache, page, cache.page_bytes

    def release(self) -> None:
        self.cache.unref(self.page)


class PagedLatentCache:
    """MLA latents in pages of `page_size` tokens drawn from one pool sized by a memory budget; each
    slot has a block table (its pages in position order). Memory is what the budget says, whatever
    the model's context: a sequence holds pages only for the tokens it has.

        cache = PagedLatentCache.for_budget(2 << 30, layers, page_size=16, width=576, dtype=torch.bfloat16,
                                            slots=64, max_len=163840)
        cache.reserve(slot, length, write_from)   # pages for positions < length, private from write_from
        cache.fork(src, dst, length)              # dst shares src's pages (n choices of one prompt)
        cache.release(slot)                       # pages go back to the pool when nobody holds them

    Pages are reference-counted: forks and the prefix cache share them, and ``reserve`` copies a
    shared page before a sequence writes into it (copy-on-write). A forward reads each row's keys
    by gathering its pages (one contiguous slice when a lone row's pages are consecutive, as the
    lowest-first free list makes them for a sequence that grew alone).
    """

    unpadded = False
    prefix_cache = True

    def __init__(self, num_layers: int, num_pages: int, page_size: int, width: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", slots: int = 1, max_len: int = 1 << 30):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages}, page_size={page_size}: both must be >= 1")
        # one page past the pool takes the writes and reads of padding positions no page backs
        self.pool = torch.zeros(num_layers, (num_pages + 1) * page_size, width, dtype=dtype, device=device)
        self.page_size, self.num_pages, self.max_len, self.scratch = page_size, num_pages, max_len, num_pages
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.refs = [0] * num_pages
        self.free_pages = list(range(num_pages))  # a heap: lowest id first
        self.slots = range(slots)  # the slots this object's forwards address (a view narrows them)
        self.positions: torch.Tensor | None = None
        self.attend_len, self.whole, self._start = 0, False, None
        self._write = self._read = None
        self._read_from: int | None = None

    @classmethod
    def for_budget(cls, budget_bytes: int, num_layers: int, page_size: int, width: int, dtype: torch.dtype,
                   **kw) -> "PagedLatentCache":
        """As many pages as `budget_bytes` holds."""
        per_page = num_layers * page_size * width * dtype.itemsize
        if budget_bytes < per_page:
            raise ValueError(f"a KV-cache budget of {budget_bytes} bytes holds no page of {per_page} bytes")
        return cls(num_layers, budget_bytes // per_page, page_size, width, dtype, **kw)

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_pages * self.page_size

    @property
    def page_bytes(self) -> int:
        return self.pool.shape[0] * self.page_size * self.pool.shape[2] * self.pool.element_size()

    @property
    def free_tokens(self) -> int:
        return len(self.free_pages) * self.page_size

    @property
    def start(self) -> int | None:
        return self._start

    # ------------------------------------------------------------------ pages
    def _take(self) -> int:
        page = heapq.heappop(self.free_pages)
        self.refs[page] = 1
        return page

    def unref(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            heapq.heappush(self.free_pages, page)

    def reserve(self, slot: int, length: int, write_from: int = 0) -> bool:
        """Pages for positions < length, those from write_from on made this slot's own (a shared one is
        copied first). False, changing nothing, when the pool has too few free pages."""
        P, table = self.page_size, self.tables[slot]
        if length > self.max_len:
            return False
        missing = max(-(-length // P) - len(table), 0)
        shared = [i for i in range(write_from // P, min(-(-length // P), len(table))) if self.refs[table[i]] > 1]
        if missing + len(shared) > len(self.free_pages):
            return False
        for i in shared:  # copy-on-write
            page = self._take()
            self.pool[:, page * P:(page + 1) * P] = self.pool[:, table[i] * P:(table[i] + 1) * P]
            self.unref(table[i])
            table[i] = page
        table.extend(self._take() for _ in range(missing))
        return True

    def release(self, slot: int) -> None:
        for page in self.tables[slot]:
            self.unref(page)
        self.tables[slot] = []

    def move(self, src: int, dst: int, length: int) -> None:
        self.tables[dst], self.tables[src] = self.tables[src], []

    def fork(self, src: int, dst: int, length: int) -> None:
        pages = self.tables[src][:-(-length // self.page_size)]
        for page in pages:
            self.refs[page] += 1
        self.tables[dst] = list(pages)

    def snapshot(self, slot: int, index: int, block: int) -> PageRef:
        if block != self.page_size:
            raise ValueError(f"prefix blocks of {block} tokens on pages of {self.page_size}")
        page = self.tables[slot][index]
        self.refs[page] += 1
        return PageRef(self, page)

    def restore(self, slot: int, blocks: list[PageRef]) -> None:
        """Start `slot` on the pages of a cached prefix (shared, not copied)."""
        self.release(slot)
        for b in blocks:
            self.refs[b.page] += 1
        self.tables[slot] = [b.page for b in blocks]

    def view(self, start: int, stop: int) -> "PagedLatentCache":
        """A cache whose forwards address slots start..stop-1 (same pool and tables)."""
        return self.subset(range(start, stop))

    def subset(self, slots) -> "PagedLatentCache":
        """A cache whose forwards address these slots, in this order (same pool and tables)."""
        part = copy.copy(self)
        part.slots = list(slots)
        return part

    # ------------------------------------------------------------------ forwards
    def prepare(self, positions: torch.Tensor, whole: bool = False) -> None:
        """positions [B, T] of the slots this view addresses: where the next forward's tokens go."""
        if whole:
            raise ValueError("the paged cache has no whole-cache step; a compiled step uses LatentCache")
        B, T = positions.shape
        P = self.page_size
        self.positions, self.attend_len = positions, int(positions.max()) + 1
        if self.attend_len > self.max_len:
            raise ValueError(f"position {self.attend_len - 1} is beyond the context of {self.max_len}")
        n = -(-self.attend_len // P)
        tables = [self.tables[s][:n] for s in self.slots]
        ids = torch.full((B, n), self.scratch, dtype=torch.long)
        for b, t in enumerate(tables):
            ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
        ids = ids.to(self.pool.device)
        self._write = ids.gather(1, positions // P) * P + positions % P  # [B, T] rows of the pool
        first = positions[:, :1]
        same = bool((positions == first[:1] + torch.arange(T, device=positions.device)).all())
        self._start = int(first[0, 0]) if same else None
        t = tables[0]
        if B == 1 and len(t) == n and t == list(range(t[0], t[0] + n)):  # one row, consecutive pages
            self._read_from, self._read = t[0] * P, None
        else:
            self._read_from = None
            self._read = (ids[:, :, None] * P + torch.arange(P, device=ids.device)).view(B, -1)[:, :self.attend_len]

    def update(self, layer_id: int, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, T, R+dr] -> the rows' keys [B, attend_len, R+dr] (gathered from their pages)."""
        kv = self.pool[layer_id]
        kv[self._write] = latent
        if self._read_from is not None:
            return kv[self._read_from:self._read_from + self.attend_len][None]
        return kv[self._read]


def attention_mask(positions: torch.Tensor, attend_len: int) -> torch.Tensor:
    """bool [B, 1, T, S]: a query at position p sees the keys at positions 0..p of its own row."""
    keys = torch.arange(attend_len, device=positions.device)
    return (keys <= positions[..., None]).unsqueeze(1)


class PrefixCache:
    """Prompt blocks of `block` tokens, keyed by a hash chain over the tokens up to each block's end,
    least recently used evicted beyond `max_bytes` (0 turns it off). What is kept per block is the
    cache's own handle: a latent copy for ``LatentCache``, a shared page for ``PagedLatentCache``
    (whose pages go back to the pool when the last holder lets go)."""

    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[bytes, object] = OrderedDict()
        self.bytes = 0

    def clear(self) -> None:
        """Forget every block (the weights changed, so the latents no longer hold)."""
        while self.blocks:
            self.evict()

    def evict(self) -> bool:
        """Drop the least recently used block; False when none is left."""
        if not self.blocks:
            return False
        handle = self.blocks.popitem(last=False)[1]
        self.bytes -= handle.nbytes
        if hasattr(handle, "release"):
            handle.release()
        return True

    def _keys(self, tokens: list[int], n_blocks: int) -> list[bytes]:
        keys, key = [], b""
        for i in range(n_blocks):
            chunk = tokens[i * self.block:(i + 1) * self.block]
            key = hashlib.blake2b(key + b"".join(t.to_bytes(4, "little") for t in chunk), digest_size=16).digest()
            keys.append(key)
        return keys

    def lookup(self, tokens: list[int], limit: int) -> list:
        """The handles of the longest cached block prefix of tokens[:limit] (empty if none)."""
        if not self.max_bytes:
            return []
        found = []
        for key in self._keys(tokens, limit // self.block):
            if key not in self.blocks:
                break
            found.append(key)
        for key in reversed(found):  # parents end up most recent: evicted after their children
            self.blocks.move_to_end(key)
        return [self.blocks[k] for k in found]

    def insert(self, tokens: list[int], snapshot) -> None:
        """Remember the full blocks of `tokens`; snapshot(i) makes block i's handle (called only
        for blocks not kept yet)."""
        if not self.max_bytes:
            return
        keys = self._keys(tokens, len(tokens) // self.block)
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            handle = snapshot(i)
            self.blocks[key] = handle
            self.bytes += handle.nbytes
        for key in reversed(keys):  # parents most recent: a child never outlives the blocks before it
            self.blocks.move_to_end(key)
        while self.bytes > self.max_bytes and self.evict():
            pass
