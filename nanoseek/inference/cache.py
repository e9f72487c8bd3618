"""The inference caches: MLA's latent cache in request slots, and the prefix cache of prompt latents.

    cache = LatentCache(num_layers, slots, max_len, kv_lora_rank + qk_rope_head_dim, dtype)
    cache.prepare(positions); kv = cache.update(layer_id, latent)   # what each MLA layer calls
    cache.move(src, dst, length)                                    # compaction: a row changes slot
    prefix = PrefixCache(max_bytes=256 << 20, block=16)
    latents = prefix.lookup(prompt, limit); prefix.insert(prompt, cache.row(slot))

The cache is MLA's promise kept: per layer and token it stores the normalised latent c_KV and the
rotary key k^R, (kv_lora_rank + qk_rope_head_dim) numbers (``ModelConfig.latent_cache_width``);
decoding attends in that latent space with W_UK / W_UV absorbed. Each batch row keeps its own
positions 0..len-1, and every forward writes its tokens' latents before it attends, so a stale
entry (padding, a rejected draft) at position p is overwritten by the row's real token p before
any query at p or later can see it: a speculative rollback is just setting the row's length back.
Rows move and prefixes are restored only through the methods here, never by writing ``kv``.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import torch


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

    def restore(self, slot: int, latents: torch.Tensor) -> None:
        """Write cached prefix latents [layers', n, width] at positions 0..n-1 of `slot`. A prefix
        kept by a cache with fewer layers (no MTP module) fills only those layers; the MTP layer's
        entries of the prefix then stay stale, which changes how often drafts are accepted, never
        the output (verification decides every token)."""
        n = min(latents.shape[0], self.kv.shape[0])
        self.kv[:n, slot, :latents.shape[1]] = latents[:n]


def attention_mask(positions: torch.Tensor, attend_len: int) -> torch.Tensor:
    """bool [B, 1, T, S]: a query at position p sees the keys at positions 0..p of its own row."""
    keys = torch.arange(attend_len, device=positions.device)
    return (keys <= positions[..., None]).unsqueeze(1)


class PrefixCache:
    """Latents [layers, block, width] of prompt blocks, keyed by a hash chain over the tokens up to
    each block's end; least recently used blocks are evicted beyond `max_bytes` (0 turns it off)."""

    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def clear(self) -> None:
        """Forget every block (the weights changed, so the latents no longer hold)."""
        self.blocks.clear()
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
