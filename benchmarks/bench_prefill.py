"""Chunked prefill: how long a streaming request waits between tokens while a long prompt joins.

    python benchmarks/bench_prefill.py                          # 16k-token prompt, budgets none / 512 / 256
    python benchmarks/bench_prefill.py --prompt-tokens 4096 --budgets 0 128 --threads 2

One process drives the inference core's scheduler directly (no HTTP, so the figure is the core's):
a request decodes on its own for a while (its idle inter-token gap is the baseline), then a
request with a --prompt-tokens prompt arrives. Until that prompt's first token, the streaming
request's gaps are recorded; reported are the median and the longest gap during the prefill,
their ratio to the idle median, and the long prompt's time to first token. Compared: the whole
prompt in one forward (budget 0, as before chunked prefill: the longest gap is the whole prefill),
chunks of a fixed token budget, and chunks sized by cost (`--prefill-chunk-cost`: a chunk takes
about that many decode steps, measured as it runs). Chunks ride in the decode rows' forward (one
ragged forward, the weights read once); `--separate` adds the same runs with the chunk in a forward
of its own (the inference core before the ragged forward) for comparison. The target (the real-scale inference issue):
with chunking, the gaps during a 16k-token prefill stay within 2x the idle ones. The model is a random-weight small DeepSeek-V3-style config
(bench_serve's, with a long context) on a paged cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.inference import Batch, Engine, SamplingParams
from nanoseek.inference.scheduler import Scheduler
from nanoseek.model import Transformer


def build_engine(context: int) -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                                             q_lora_rank=128, kv_lora_rank=64, max_position_embeddings=context,
                                             eos_token_id=None)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return Engine(model)


def run(engine: Engine, budget: int | None, chunk_cost: float | None, prompt_tokens: int, idle_steps: int) -> dict:
    sched = Scheduler(engine, max_batch=4, kv_cache_bytes=256 << 20, block=16, max_batched_tokens=budget,
                      chunk_cost=chunk_cost, prefix_cache_bytes=0).start()
    stamps, first = [], threading.Event()

    def on_stream(ev):
        if ev.token_ids:
            stamps.append(time.perf_counter())

    def on_long(ev):
        if ev.token_ids or ev.finish_reason:
            first.set()
    try:
        sched.submit([5, 6, 7, 8], SamplingParams(max_tokens=sched.context - 8, ignore_eos=True), on_stream)
        while len(stamps) < idle_steps + 1:
            time.sleep(0.01)
        idle = [b - a for a, b in zip(stamps, stamps[1:])]
        mark = len(stamps)
        t0 = time.perf_counter()
        sched.submit([(i * 7919) % 900 + 3 for i in range(prompt_tokens)], SamplingParams(max_tokens=1), on_long)
        first.wait(600)
        ttft = time.perf_counter() - t0
        while stamps[-1] < t0 + ttft:  # the gap that spans the end of the prefill closes
            time.sleep(0.001)
        during = [b - a for a, b in zip(stamps[mark - 1:], stamps[mark:]) if a < t0 + ttft]
    finally:
        sched.stop()
    return dict(idle=statistics.median(idle), median=statistics.median(during) if during else float("nan"),
                longest=max(during) if during else float("nan"), ttft=ttft, gaps=len(during))


def step_costs(engine: Engine, context: int, chunks: list[int], repeats: int = 30) -> None:
    """One decode row (context 64) alone, then with a prefill chunk of each size at `context`:
    the step's time as one ragged forward and as two forwards (lower-quartile ms of `repeats`)."""
    cfg, cache = engine.config, engine.new_cache(2, context + max(chunks) + 1)
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 900, (1, n), generator=gen)

    def timed(f):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 4] * 1e3
    with torch.inference_mode():
        engine.forward(ids(64), torch.arange(64)[None], cache.view(0, 1), absorb=False)
        for a in range(0, context, 1024):
            n = min(1024, context - a)
            engine.forward(ids(n), torch.arange(a, a + n)[None], cache.view(1, 2), absorb=False)
        row, pos = ids(1), torch.tensor([[64]])
        alone = timed(lambda: engine.forward(row, pos, cache.view(0, 1), absorb=True))
        for k in chunks:
            chunk, at = ids(k), torch.arange(context, context + k)[None]
            absorb = k * (cfg.kv_lora_rank - cfg.qk_nope_head_dim) < cfg.kv_lora_rank * (
                cfg.qk_nope_head_dim + cfg.v_head_dim)  # the batch's rule for a chunk after a prefix
            ragged = timed(lambda: engine.forward_ragged([(row, pos, cache.view(0, 1), True),
                                                          (chunk, at, cache.view(1, 2), absorb)]))
            two = timed(lambda: (engine.forward(row, pos, cache.view(0, 1), absorb=True),
                                 engine.forward(chunk, at, cache.view(1, 2), absorb=absorb)))
            print(f"chunk {k:4d} at {context:,}: decode alone {alone:.2f} ms, ragged {ragged:.2f} ms "
                  f"({ragged / alone:.2f}x), two forwards {two:.2f} ms ({two / alone:.2f}x)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=16384, help="the joining prompt's length")
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 512, 256],
                    help="--max-num-batched-tokens values to compare (0: no chunking)")
    ap.add_argument("--chunk-costs", type=float, nargs="+", default=[1.0],
                    help="--prefill-chunk-cost values to compare (a chunk costs about this many decode steps)")
    ap.add_argument("--idle-steps", type=int, default=30, help="tokens streamed before the long prompt arrives")
    ap.add_argument("--separate", action="store_true",
                    help="also run each chunked setting with the chunk in its own forward (no ragged forward)")
    ap.add_argument("--step-costs", type=int, nargs="*", default=None, metavar="TOKENS",
                    help="instead: time one decode step alone and with a chunk of each size at --prompt-tokens "
                         "of context (ragged vs two forwards)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(4 * args.prompt_tokens + 64)  # the streaming request outlasts the prefill
    if args.step_costs is not None:
        step_costs(engine, args.prompt_tokens, args.step_costs or [4, 16, 64, 256])
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {engine.model.num_params() / 1e6:.1f}M "
          f"params, a {args.prompt_tokens:,}-token prompt joins a streaming request")
    print(f"{'chunks':>26}{'idle gap ms':>13}{'median during':>15}{'longest during':>16}{'longest/idle':>14}"
          f"{'prompt TTFT s':>15}")
    runs = [(f"{b} tokens" if b else "whole prompt", b or None, None) for b in args.budgets]
    runs += [(f"cost {c:g} steps", None, c) for c in args.chunk_costs]
    runs = [(name, budget, cost, True) for name, budget, cost in runs]
    if args.separate:
        runs += [(name + ", own fwd", budget, cost, False) for name, budget, cost, _ in runs if budget or cost]
    rides_along = Batch._rides_along
    for name, budget, cost, ragged in runs:
        Batch._rides_along = rides_along if ragged else (lambda self: False)
        r = run(engine, budget, cost, args.prompt_tokens, args.idle_steps)
        print(f"{name:>26}{r['idle'] * 1e3:>13.1f}{r['median'] * 1e3:>15.1f}{r['longest'] * 1e3:>16.1f}"
              f"{r['longest'] / r['idle']:>13.1f}x{r['ttft']:>15.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
