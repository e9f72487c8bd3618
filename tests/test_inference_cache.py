"""Latent cache (writes at each row's own positions, row moves, prefix restores) and the prefix cache."""

import torch

from nanoseek.inference.cache import LatentCache, PagedLatentCache, PrefixCache, attention_mask


def test_cache_writes_at_each_rows_own_positions():
    cache = LatentCache(num_layers=1, batch_size=2, max_len=6, width=3, dtype=torch.float32)
    cache.prepare(torch.tensor([[1], [4]]))
    keys = cache.update(0, torch.tensor([[[1.0, 1, 1]], [[2.0, 2, 2]]]))
    assert keys.shape == (2, 5, 3)
    assert cache.kv[0, 0, 1].tolist() == [1, 1, 1] and cache.kv[0, 1, 4].tolist() == [2, 2, 2]
    assert cache.kv[0].abs().sum() == 9
    mask = attention_mask(torch.tensor([[1], [4]]), 5)
    assert mask.shape == (2, 1, 1, 5)
    assert mask[0, 0, 0].tolist() == [True, True, False, False, False]
    assert mask[1, 0, 0].tolist() == [True] * 5


def test_rows_move_and_prefixes_restore_through_the_cache():
    cache = LatentCache(num_layers=2, batch_size=3, max_len=4, width=2, dtype=torch.float32)
    cache.kv[:, 2, :3] = torch.arange(12.0).view(2, 3, 2)
    cache.move(2, 0, 3)
    assert torch.equal(cache.row(0)[:, :3], cache.row(2)[:, :3]) and cache.row(0)[:, 3].abs().sum() == 0
    prefix = [torch.ones(1, 1, 2), torch.ones(1, 1, 2)]  # kept by a cache with one layer fewer (no MTP module)
    cache.restore(1, prefix)
    assert cache.row(1)[0, :2].eq(1).all() and cache.row(1)[1].abs().sum() == 0


def blocks_of(kv, block):
    """A prefix-cache snapshot function over latents kv [layers, n, width]."""
    return lambda i: kv[:, i * block:(i + 1) * block].clone()


def test_prefix_cache_is_lru_bounded_and_keeps_a_token_to_prefill():
    block = torch.ones(2, 4, 3)
    pc = PrefixCache(max_bytes=3 * block.nbytes, block=4)
    pc.insert(list(range(8)), blocks_of(torch.ones(2, 8, 3), 4))
    assert len(pc.lookup(list(range(8)), 7)) == 1  # the last token is always prefilled
    assert torch.cat(pc.lookup(list(range(8)) + [9], 8), dim=1).shape == (2, 8, 3)
    assert pc.lookup([1] + list(range(1, 9)), 8) == []  # differs in the first block
    pc.insert(list(range(100, 108)), blocks_of(torch.ones(2, 8, 3), 4))
    assert pc.bytes <= pc.max_bytes and len(pc.blocks) == 3
    assert PrefixCache(0).lookup([1, 2, 3], 2) == []


def test_prefix_cache_evicts_children_before_their_parents():
    pc = PrefixCache(max_bytes=2 * torch.ones(2, 4, 3).nbytes, block=4)
    pc.insert(list(range(12)), blocks_of(torch.ones(2, 12, 3), 4))  # three blocks, room for two: the last goes
    assert len(pc.lookup(list(range(12)), 12)) == 2


# ----------------------------------------------------------------------------- paged

def paged(num_pages=6, page=4, slots=3, layers=2, width=3):
    return PagedLatentCache(layers, num_pages, page, width, torch.float32, slots=slots, max_len=64)


def test_pages_are_reserved_shared_copied_on_write_and_given_back():
    c = paged()
    assert c.reserve(0, 6) and c.tables[0] == [0, 1] and c.free_tokens == 16
    c.pool[:, 4:8] = 7.0  # page 1 holds positions 4..7 of slot 0
    c.fork(0, 1, 6)  # slot 1 shares both pages
    assert c.tables[1] == [0, 1] and c.refs[:2] == [2, 2]
    assert c.reserve(1, 7, write_from=6)  # slot 1 writes position 6: its page 1 is copied first
    assert c.tables[1][0] == 0 and c.tables[1][1] not in (0, 1) and c.refs[:2] == [2, 1]
    assert c.pool[:, c.tables[1][1] * 4:c.tables[1][1] * 4 + 4].eq(7.0).all()
    assert not c.reserve(2, 64)  # more than the pool: nothing changes
    assert c.tables[2] == [] and len(c.free_pages) == 3
    c.release(0)
    c.release(1)
    assert len(c.free_pages) == 6 and c.refs == [0] * 6


def test_paged_reads_equal_a_contiguous_cache_whatever_the_page_order():
    torch.manual_seed(0)
    c, ref = paged(num_pages=8, page=2, slots=2), LatentCache(2, 2, 16, 3, torch.float32)
    c.reserve(1, 3)  # slot 1 takes pages first
    for new in (range(0, 3), range(3, 5)):  # a prefill of 3 tokens, then 2 more
        for slot in (0, 1):
            assert c.reserve(slot, new.stop, new.start)
        positions = torch.tensor(list(new)).expand(2, -1)
        latent = torch.randn(2, len(new), 3)
        c.prepare(positions)
        ref.prepare(positions)
        for layer in range(2):
            assert torch.equal(c.update(layer, latent + layer), ref.update(layer, latent + layer))
    assert c.tables[0] == [2, 3, 4] and c.tables[1] == [0, 1, 5]  # interleaved: read by gathering
    alone = paged(num_pages=8, page=2, slots=1)  # one row on consecutive pages: read as one slice
    alone.reserve(0, 5)
    alone.prepare(torch.arange(5)[None])
    x = torch.randn(1, 5, 3)
    assert torch.equal(alone.update(0, x), x)


def test_prefix_blocks_on_pages_are_shared_and_return_to_the_pool():
    c = paged(num_pages=4, page=4, slots=2)
    pc = PrefixCache(max_bytes=1 << 20, block=4)
    c.reserve(0, 9)
    pc.insert(list(range(9)), lambda k: c.snapshot(0, k, 4))  # two full pages kept
    c.release(0)
    assert len(c.free_pages) == 2  # the kept pages stay out of the pool
    c.restore(1, pc.lookup(list(range(9)), 8))
    assert c.tables[1] == [0, 1] and c.refs[:2] == [2, 2]
    c.release(1)
    pc.clear()
    assert len(c.free_pages) == 4
