"""Latent cache (writes at each row's own positions, row moves, prefix restores) and the prefix cache."""

import torch

from nanoseek.inference.cache import LatentCache, PrefixCache, attention_mask


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
    prefix = torch.ones(1, 2, 2)  # kept by a cache with one layer fewer (no MTP module)
    cache.restore(1, prefix)
    assert cache.row(1)[0, :2].eq(1).all() and cache.row(1)[1].abs().sum() == 0


def test_prefix_cache_is_lru_bounded_and_keeps_a_token_to_prefill():
    block = torch.ones(2, 4, 3)
    pc = PrefixCache(max_bytes=3 * block.nbytes, block=4)
    pc.insert(list(range(8)), torch.ones(2, 8, 3))
    assert pc.lookup(list(range(8)), 7).shape == (2, 4, 3)  # the last token is always prefilled
    assert pc.lookup(list(range(8)) + [9], 8).shape == (2, 8, 3)
    assert pc.lookup([1] + list(range(1, 9)), 8) is None  # differs in the first block
    pc.insert(list(range(100, 108)), torch.ones(2, 8, 3))
    assert pc.bytes <= pc.max_bytes and len(pc.blocks) == 3
    assert PrefixCache(0).lookup([1, 2, 3], 2) is None


def test_prefix_cache_evicts_children_before_their_parents():
    pc = PrefixCache(max_bytes=2 * torch.ones(2, 4, 3).nbytes, block=4)
    pc.insert(list(range(12)), torch.ones(2, 12, 3))  # three blocks, room for two: the last one goes
    assert pc.lookup(list(range(12)), 12).shape == (2, 8, 3)
