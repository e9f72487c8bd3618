"""Serving scheduler: continuous batching equals Engine.generate, joins, cancels, prefix cache, queue."""

import pytest
import torch
from conftest import randomize_, tokens

from nanoseek.config import ModelConfig
from nanoseek.inference import Engine
from nanoseek.model import Transformer
from nanoseek.inference import SamplingParams
from nanoseek.inference.scheduler import NotRunning, QueueFull, Scheduler
from nanoseek.tokenizer import Tokenizer

PROMPTS = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18], [40] * 20, [7, 7, 100, 200, 300, 9]]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(eos_token_id=None, max_position_embeddings=256)
    return Engine(randomize_(Transformer(cfg), scale=0.1))


def collect(sched, prompt, params):
    """Submit and return (events, request); events accumulate as the scheduler steps."""
    events = []
    return events, sched.submit(prompt, params, events.append)


def ids_of(events):
    return [t for e in events for t in e.token_ids]


def drain(sched, limit=10_000):
    for _ in range(limit):
        if not sched.step() and sched.waiting == 0:
            return
    raise AssertionError("the scheduler did not finish")


def test_batched_greedy_equals_engine_generate_per_prompt(engine):
    sched = Scheduler(engine, max_batch=8, prefix_cache_bytes=0)
    runs = [collect(sched, p, SamplingParams(max_tokens=12 + i)) for i, p in enumerate(PROMPTS)]
    drain(sched)
    for (events, req), p in zip(runs, PROMPTS):
        assert ids_of(events) == engine.generate([p], len(req.out))[0].tokens == req.out
        assert events[-1].finish_reason == "length" and sum(e.finish_reason is not None for e in events) == 1
    assert sched.stats["rows_decoded"] > sched.stats["steps"]  # rows really shared steps


def test_requests_join_mid_stream_and_more_requests_than_slots(engine):
    sched = Scheduler(engine, max_batch=2, prefix_cache_bytes=0)
    first = collect(sched, PROMPTS[0], SamplingParams(max_tokens=20))
    for _ in range(5):
        sched.step()
    later = [collect(sched, p, SamplingParams(max_tokens=9)) for p in PROMPTS[1:]]
    assert len(sched.rows) == 1
    sched.step()
    assert len(sched.rows) == 2 and sched.waiting == len(PROMPTS) - 2  # one joined, the rest wait
    drain(sched)
    for (events, _), p in zip([first] + later, PROMPTS):
        assert ids_of(events) == engine.generate([p], 20 if p is PROMPTS[0] else 9)[0].tokens


def test_seeded_sampling_is_per_request_and_matches_the_engine(engine):
    sched = Scheduler(engine, max_batch=4, prefix_cache_bytes=0)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    a = collect(sched, PROMPTS[2], params)
    noise = collect(sched, PROMPTS[0], SamplingParams(max_tokens=10, temperature=1.0, seed=1))
    drain(sched)
    want = engine.generate([PROMPTS[2]], 10, temperature=0.9, top_p=0.95, seed=7)[0].tokens
    assert ids_of(a[0]) == want and ids_of(noise[0]) != want


@pytest.mark.parametrize("sampled", [False, True])
def test_mtp_speculative_scheduler_equals_the_engine_with_top_k(engine, sampled):
    """The server's scheduler drafts with MTP and verifies like Engine.generate(speculative="mtp"),
    rows joining and leaving; top-k and a seed give the engine's tokens for the same request."""
    sched = Scheduler(engine, max_batch=3, prefix_cache_bytes=0, speculative="mtp")
    kw = dict(temperature=0.8, top_k=20, seed=11) if sampled else {}
    runs = [collect(sched, p, SamplingParams(max_tokens=10 + i, **kw)) for i, p in enumerate(PROMPTS)]
    drain(sched)
    for (events, req), p in zip(runs, PROMPTS):
        want = engine.generate([p], req.params.max_tokens, speculative="mtp", **kw)[0].tokens
        assert ids_of(events) == want
        if not sampled:
            assert want == engine.generate([p], req.params.max_tokens)[0].tokens  # = plain greedy
    assert sched.stats["drafted"] > 0


def test_a_paged_scheduler_with_a_token_budget_equals_the_engine_under_preemption(engine):
    """A pool of 64 tokens for 4 rows needing up to ~90 at once: rows are preempted and resumed,
    prompts are prefilled in chunks of the step budget, prefixes share pages; every output is the
    engine's."""
    cfg = engine.config
    budget = 16 * cfg.num_hidden_layers * 4 * cfg.cache_width * 4  # 16 pages of 4 tokens, fp32
    sched = Scheduler(engine, max_batch=4, block=4, kv_cache_bytes=budget, max_batched_tokens=6,
                      prefix_cache_bytes=1 << 20)
    runs = [collect(sched, p, SamplingParams(max_tokens=12 + i)) for i, p in enumerate(PROMPTS)]
    drain(sched)
    for (events, req), p in zip(runs, PROMPTS):
        assert ids_of(events) == engine.generate([p], req.params.max_tokens)[0].tokens
        assert events[-1].finish_reason == "length"
    assert sched.stats["preempted"] > 0 and sched.batch.cache.capacity == 64
    with pytest.raises(ValueError, match="exceed the context of 64"):  # more than the whole pool
        sched.submit([1] * 60, SamplingParams(max_tokens=10))


def test_cancel_frees_the_slot(engine):
    sched = Scheduler(engine, max_batch=1, prefix_cache_bytes=0)
    events, req = collect(sched, PROMPTS[0], SamplingParams(max_tokens=100))
    waiting, _ = collect(sched, PROMPTS[1], SamplingParams(max_tokens=5))
    sched.step()
    sched.step()
    assert sched.rows == [req] and sched.waiting == 1
    req.cancel()
    drain(sched)
    assert events[-1].finish_reason == "cancelled" and len(ids_of(events)) < 100
    assert ids_of(waiting) == engine.generate([PROMPTS[1]], 5)[0].tokens
    assert sched.rows == []


def test_eos_ends_a_request(engine):
    want = engine.generate([PROMPTS[0]], 8)[0].tokens
    eos = want[3]
    cfg = engine.config.replace(eos_token_id=eos)
    eng = Engine(engine.model, None)
    eng.config = cfg
    sched = Scheduler(eng, max_batch=2, prefix_cache_bytes=0)
    events, req = collect(sched, PROMPTS[0], SamplingParams(max_tokens=8))
    drain(sched)
    assert ids_of(events) == want[:want.index(eos)] and events[-1].finish_reason == "stop"


def test_prefix_cache_suffix_prefill_matches_whole_prefill(engine):
    """Latents copied from the prefix cache + prefill of the rest == prefill of the whole prompt."""
    prompt = list(range(20, 60))  # 40 tokens: two 16-token blocks cached, 8 left to prefill
    sched = Scheduler(engine, max_batch=2, block=16)
    first = collect(sched, prompt, SamplingParams(max_tokens=10))
    drain(sched)
    second = collect(sched, prompt[:36] + [1, 2, 3], SamplingParams(max_tokens=10))
    drain(sched)
    assert first[0][-1].cached_tokens == 0 and second[0][-1].cached_tokens == 32
    assert second[0][-1].prompt_tokens == 39
    assert ids_of(first[0]) == engine.generate([prompt], 10)[0].tokens
    assert ids_of(second[0]) == engine.generate([prompt[:36] + [1, 2, 3]], 10)[0].tokens
    assert sched.stats["cached_tokens"] == 32

    # the logits themselves, copy + suffix against one whole forward
    with torch.inference_mode():
        cache = engine.new_cache(1, 64)
        whole = engine.logits(engine.forward(torch.tensor([prompt]), torch.arange(40)[None], cache, absorb=False))
        split = engine.new_cache(1, 64)
        split.restore(0, sched.batch.prefix.lookup(prompt, 39))
        tail = engine.logits(engine.forward(torch.tensor([prompt[32:]]), torch.arange(32, 40)[None], split,
                                            absorb=False))
    torch.testing.assert_close(tail[0], whole[0, 32:], rtol=1e-5, atol=1e-5)


POISON = 0.123  # a temperature whose sampling raises (fail_to_sample), standing in for any kernel error


def fail_to_sample(monkeypatch):
    from nanoseek.inference import batch
    real = batch.sample

    def sample(logits, temperature, *args):
        if temperature == POISON:
            raise RuntimeError("probability tensor contains inf or nan")
        return real(logits, temperature, *args)
    monkeypatch.setattr(batch, "sample", sample)


def test_a_request_whose_sampling_fails_ends_alone(engine, monkeypatch):
    """A row whose sampling raises, at join or in a shared decode step, fails alone."""
    fail_to_sample(monkeypatch)
    sched = Scheduler(engine, max_batch=4, prefix_cache_bytes=0)
    good = collect(sched, PROMPTS[0], SamplingParams(max_tokens=12))
    bad_at_join = collect(sched, PROMPTS[1], SamplingParams(max_tokens=12, temperature=POISON))
    bad_later = collect(sched, PROMPTS[2], SamplingParams(max_tokens=12, temperature=1.0, seed=0))
    sched.step()
    bad_later[1].params.temperature = POISON  # now the failure comes in a shared decode step
    drain(sched)
    assert ids_of(good[0]) == engine.generate([PROMPTS[0]], 12)[0].tokens and good[0][-1].finish_reason == "length"
    for events, _ in (bad_at_join, bad_later):
        assert events[-1].finish_reason == "error" and "failed" in events[-1].error


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_or_stopped_scheduler_ends_every_request(engine, monkeypatch):
    import threading

    def listen():
        done, events = threading.Event(), []
        return done, events, lambda e: (events.append(e), e.finish_reason and done.set())

    for kill in ("crash", "stop"):
        sched = Scheduler(engine, max_batch=1, prefix_cache_bytes=0)
        if kill == "crash":
            monkeypatch.setattr(sched, "step", lambda: 1 / 0)
        runs = [listen() for _ in range(3)]
        for p, (_, _, on_event) in zip(PROMPTS, runs):  # queued before the thread starts: all wait
            sched.submit(p, SamplingParams(max_tokens=200), on_event)
        sched.start()
        if kill == "stop":
            sched.stop()
        assert all(done.wait(30) for done, _, _ in runs)
        for _, events, _ in runs:
            assert events[-1].finish_reason == "error"
        sched.stop()
        assert not sched.alive
        with pytest.raises(NotRunning):
            sched.submit([1], SamplingParams(max_tokens=1))


def test_text_stop_sequences_and_held_back_text(engine):
    tok = Tokenizer.train(["abc def ghi", "hello world"] * 10, vocab_size=300)
    eng = Engine(engine.model, tok)
    ids = eng.generate([[5, 6, 7]], 30)[0].tokens
    text = tok.decode(ids)
    stop = text[10:13]
    sched = Scheduler(eng, max_batch=2, prefix_cache_bytes=0)
    events, _ = collect(sched, [5, 6, 7], SamplingParams(max_tokens=30, stop=[stop]))
    drain(sched)
    out = "".join(e.text for e in events)
    assert out == text[:text.find(stop)] and events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)


def test_queue_full_and_bad_requests(engine):
    sched = Scheduler(engine, max_batch=1, queue_size=2)
    sched.submit([1, 2], SamplingParams(max_tokens=2))
    sched.submit([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        sched.submit([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="exceed the context"):
        sched.submit([1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="token ids"):
        sched.submit([], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="temperature"):
        sched.submit([1], SamplingParams(max_tokens=2, temperature=-1))
    with pytest.raises(ValueError, match="non-empty"):
        sched.submit([1], SamplingParams(max_tokens=2, stop=[""]))


def test_cancelled_waiting_requests_give_their_queue_places_to_live_ones(engine):
    sched = Scheduler(engine, max_batch=1, queue_size=2, prefix_cache_bytes=0)  # not started: nothing drains
    gone_events, gone = collect(sched, [1, 2], SamplingParams(max_tokens=2))
    live_events, _ = collect(sched, [3, 4], SamplingParams(max_tokens=2))
    gone.cancel()  # its client disconnected while it waited
    late_events, _ = collect(sched, [5, 6], SamplingParams(max_tokens=2))  # takes the cancelled one's place
    assert gone_events[-1].finish_reason == "cancelled" and sched.waiting == 2
    with pytest.raises(QueueFull):  # no cancelled request left to drop
        sched.submit([7], SamplingParams(max_tokens=2))
    drain(sched)
    assert live_events[-1].finish_reason == late_events[-1].finish_reason == "length"


def test_thread_runs_requests_and_stops(engine):
    import threading
    sched = Scheduler(engine, max_batch=4).start()
    try:
        done = [threading.Event() for _ in PROMPTS]
        outs = [[] for _ in PROMPTS]

        def listener(i):
            def on_event(e):
                outs[i].extend(e.token_ids)
                if e.finish_reason:
                    done[i].set()
            return on_event
        for i, p in enumerate(PROMPTS):
            sched.submit(p, SamplingParams(max_tokens=6), listener(i))
        assert all(d.wait(30) for d in done)
        assert outs == tokens(engine.generate(PROMPTS, 6))
    finally:
        sched.stop()
    assert not sched.alive


def test_an_unseeded_request_leaves_the_global_rng_alone(engine):
    sched = Scheduler(engine, max_batch=2, prefix_cache_bytes=0)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    a = sched.submit([1, 2], SamplingParams(max_tokens=2, temperature=1.0))
    b = sched.submit([1, 2], SamplingParams(max_tokens=2, temperature=1.0))
    assert torch.equal(torch.rand(3), want) and a.generator.initial_seed() != b.generator.initial_seed()
