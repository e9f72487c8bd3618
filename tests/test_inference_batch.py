"""The step function on a paged cache: pages across boundaries, chunked prefill, prefix pages,
shared prompts with copy-on-write, preemption and resume; each against Engine.generate."""

import pytest
import torch
from conftest import randomize_

from nanoseek.config import ModelConfig
from nanoseek.inference import Batch, Engine, SamplingParams, Sequence
from nanoseek.inference.cache import PagedLatentCache, PrefixCache
from nanoseek.inference.sequence import new_generator
from nanoseek.model import Transformer

PROMPTS = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18], list(range(40, 63)), [7, 7, 100, 200, 300, 9]]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(eos_token_id=None, max_position_embeddings=256)
    return Engine(randomize_(Transformer(cfg), scale=0.1))


def paged_batch(engine, pages=64, page=4, slots=8, speculative=None, budget=None, prefix_bytes=0):
    cfg = engine.config
    cache = PagedLatentCache(cfg.num_hidden_layers + (speculative == "mtp"), pages, page, cfg.cache_width,
                             engine.dtype, slots=slots, max_len=cfg.max_position_embeddings)
    return Batch(engine, slots, cfg.max_position_embeddings, speculative, PrefixCache(prefix_bytes, page), cache,
                 max_batched_tokens=budget)


def drive(batch, seqs, admitted=(), limit=10_000):
    """Admit `seqs` as slots free up, step, let finished rows leave, admit preempted rows again
    first; returns the tokens of `admitted` (already in the batch) and `seqs`."""
    waiting = list(seqs)
    for _ in range(limit):
        while waiting and batch.free:
            batch.admit([waiting.pop(0)])
        if not batch.rows and not waiting:
            return [s.out for s in [*admitted, *seqs]]
        batch.step()
        batch.leave()
        waiting[:0] = batch.take_preempted()
    raise AssertionError("the batch did not finish")


def want(engine, prompts, n, **kw):
    return [engine.generate([p], n, **kw)[0].tokens for p in prompts]


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_paged_decode_equals_the_slot_cache_across_page_boundaries(engine, speculative):
    seqs = [Sequence(p, SamplingParams(max_tokens=21)) for p in PROMPTS]
    assert drive(paged_batch(engine, page=4, speculative=speculative), seqs) == want(engine, PROMPTS, 21)


@pytest.mark.parametrize("budget", [3, 8])
def test_chunked_prefill_gives_the_tokens_of_whole_prefill(engine, budget):
    batch = paged_batch(engine, budget=budget)
    seqs = [Sequence(p, SamplingParams(max_tokens=12)) for p in PROMPTS]
    assert drive(batch, seqs) == want(engine, PROMPTS, 12)
    assert batch.stats["prefill_tokens"] == sum(map(len, PROMPTS))


def test_chunked_prefill_gives_the_logits_of_whole_prefill(engine):
    prompt = torch.tensor([PROMPTS[3]])
    n = prompt.shape[1]
    with torch.inference_mode():
        whole = engine.logits(engine.forward(prompt, torch.arange(n)[None], engine.new_cache(1, 64), absorb=False))
        cache, parts = engine.new_cache(1, 64), []
        for a in range(0, n, 5):
            ids = prompt[:, a:a + 5]
            parts.append(engine.logits(engine.forward(ids, torch.arange(a, a + ids.shape[1])[None], cache,
                                                      absorb=False)))
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_decoding_rows_keep_streaming_while_a_long_prompt_is_prefilled(engine):
    batch = paged_batch(engine, budget=4)
    short = Sequence(PROMPTS[0], SamplingParams(max_tokens=30))
    batch.admit([short])
    for _ in range(2):
        batch.step()
    long = Sequence(list(range(1, 120)), SamplingParams(max_tokens=4))
    batch.admit([long])
    made = len(short.out)
    for _ in range(10):  # 119 prompt tokens at <= 4 per step: prefilled over ~30 steps...
        batch.step()
    assert len(short.out) == made + 10 and long.out == []  # ...while the short row made a token every step


def test_prefix_blocks_are_shared_pages_and_keep_the_output(engine):
    batch = paged_batch(engine, page=4, prefix_bytes=1 << 20)
    prompt = list(range(20, 50))
    first = drive(batch, [Sequence(prompt, SamplingParams(max_tokens=8))])
    again = Sequence(prompt[:26] + [1, 2, 3], SamplingParams(max_tokens=8))
    assert drive(batch, [again]) == want(engine, [again.prompt], 8) and again.cached_tokens == 24
    assert first == want(engine, [prompt], 8)


def test_identical_prompts_prefill_once_and_copy_pages_on_write(engine):
    batch = paged_batch(engine, page=4, slots=6)
    group = [Sequence(PROMPTS[2], SamplingParams(max_tokens=10, temperature=1.0, seed=i), generator=new_generator(i, "cpu"))
             for i in range(4)]
    greedy = [Sequence(PROMPTS[2], SamplingParams(max_tokens=10)) for _ in range(2)]
    batch.admit(group)
    assert batch.stats["prefill_tokens"] == len(PROMPTS[2])  # one forward for the four
    assert all(batch.cache.tables[i][:2] == batch.cache.tables[0][:2] for i in range(4))  # full pages shared
    outs = drive(batch, [], admitted=group)
    assert len({tuple(o) for o in outs}) > 1  # own generators: the samples differ
    for s in group:
        alone = Engine(engine.model).generate([PROMPTS[2]], 10, temperature=1.0, seed=s.params.seed)[0]
        assert s.out == alone.tokens  # each row is what its request alone would make
    assert drive(batch, greedy) == want(engine, [PROMPTS[2]] * 2, 10)


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_a_full_pool_preempts_the_newest_row_which_resumes_unchanged(engine, speculative):
    batch = paged_batch(engine, pages=16, page=4, slots=4, speculative=speculative)  # 64 tokens for 4 rows
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[1]]
    seqs = [Sequence(p, SamplingParams(max_tokens=20)) for p in prompts]
    assert drive(batch, seqs) == want(engine, prompts, 20)
    assert batch.stats["preempted"] > 0 and len(batch.cache.free_pages) == 16


def test_a_sequence_longer_than_the_whole_pool_ends_with_an_error(engine):
    batch = paged_batch(engine, pages=3, page=4, slots=2)
    s = Sequence(PROMPTS[2], SamplingParams(max_tokens=20))
    drive(batch, [s])
    assert s.finish_reason == "error" and "cannot hold" in s.error


def test_a_prefill_chunk_rides_in_the_decode_rows_forward(engine, monkeypatch):
    batch = paged_batch(engine, budget=6)
    short = Sequence(PROMPTS[0], SamplingParams(max_tokens=40))
    batch.admit([short])
    batch.step()
    batch.step()  # the first plain decode step is timed: chunks are sized by it
    long = Sequence(list(range(1, 60)), SamplingParams(max_tokens=5))
    batch.admit([long])
    calls = []
    forward_hidden = engine.model.forward_hidden
    monkeypatch.setattr(engine.model, "forward_hidden", lambda *a, **k: calls.append(1) or forward_hidden(*a, **k))
    before = batch.stats["prefill_tokens"]
    for _ in range(3):
        batch.step()
    assert len(calls) == 3 and batch.stats["prefill_tokens"] - before == 3 * 5  # one forward per step: 1 + 5 tokens
    monkeypatch.undo()
    assert drive(batch, [], admitted=[short, long]) == want(engine, [PROMPTS[0]], 40) + want(engine, [long.prompt], 5)
