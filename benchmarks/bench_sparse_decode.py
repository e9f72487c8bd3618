"""DeepSeek Sparse Attention at long context: decode ms/token of a V3.2-shaped model, sparse vs dense MLA.

    .venv/bin/python benchmarks/bench_sparse_decode.py                          # contexts 4k, 32k, 128k
    .venv/bin/python benchmarks/bench_sparse_decode.py --contexts 4096 16384 --steps 8 --threads 2

Model (random weights, fp32): bench_decode.py's shape cut to 4 layers (the first dense) — hidden 1024,
16 heads, q_lora_rank 384, kv_lora_rank 256, qk_nope 64, qk_rope 32, v_head 64, 32 routed experts
top-4 + 1 shared — with V3.2's published k = index_topk = 2048 and a lightning indexer of 16 heads of
64 (V3.2: 64 of 128 against 128 MLA heads). "dense" is the same weights as deepseek_v3 (no indexer).

What is timed: the engine's decode step (``Engine.decode``: one absorbed forward over the slot
cache, then lm_head and argmax) for one sequence whose cache already holds `context` tokens. The
cache is filled with random values of the scale the model writes (unit-RMS latents and indexer
keys) instead of prefilling: prefilling 128k tokens takes hours on a laptop CPU, and a decode step's
work depends on how many entries it reads, not on their values. ms/token is the median of --steps.

--transformers-contexts: transformers' DeepseekV32ForCausalLM on the same weights (saved by nanoseek,
loaded by transformers) at those contexts: its cache has to be built by its own prefill (a random
prompt, generate's prefill_chunk_size=1024), then its decode steps are timed between forwards (a logits
processor stamps each one), beside nanoseek's sparse step at the same context.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.inference import Engine

SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
             qk_rope_head_dim=32, v_head_dim=64, first_k_dense_replace=1, moe_intermediate_size=512,
             n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
             num_nextn_predict_layers=0, max_position_embeddings=1 << 18)
DSA = dict(index_topk=2048, index_n_heads=16, index_head_dim=64)


def models() -> dict[str, Transformer]:
    torch.manual_seed(0)
    sparse = Transformer(ModelConfig.family("deepseek_v32", **SHAPE, **DSA)).eval()
    dense = Transformer(ModelConfig.family("deepseek_v3", **SHAPE)).eval()
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if ".indexer." not in k})
    return {"sparse (DSA)": sparse, "dense MLA": dense}


def time_decode(model: Transformer, context: int, steps: int) -> float:
    """Median ms of one decode step at `context` cached tokens."""
    engine = Engine(model)
    cache = engine.new_cache(1, context + steps + 1)
    cache.kv.normal_()  # unit-RMS entries, like the normed latents and LayerNorm'ed indexer keys
    token, times = torch.tensor([[5]]), []
    with torch.no_grad():
        for i in range(steps + 1):
            t0 = time.perf_counter()
            hidden = engine.decode(token, torch.tensor([[context + i]]), cache)
            token = model.lm_head(hidden[:, -1:]).argmax(-1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3  # the first step warms up


def transformers_decode(model: Transformer, contexts: list[int], steps: int) -> dict[int, float]:
    """Median ms of transformers' decode step at each context, after its own chunked prefill."""
    import tempfile
    import warnings

    import transformers

    from nanoseek import save_pretrained
    out = {}
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pretrained(model, d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for ctx in contexts:
            stamps = []

            def stamp(input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

            prompt = torch.randint(1, SHAPE["vocab_size"], (1, ctx), generator=torch.Generator().manual_seed(ctx))
            with torch.inference_mode():
                ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps + 2,
                             min_new_tokens=steps + 2, do_sample=False, logits_processor=[stamp], pad_token_id=0,
                             prefill_chunk_size=1024)
            out[ctx] = statistics.median([b - a for a, b in zip(stamps[1:], stamps[2:])]) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--steps", type=int, default=6, help="timed decode steps per context")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--transformers-contexts", type=int, nargs="*", default=[],
                   help="also time transformers' V3.2 decode at these contexts (after its own prefill)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = models()
    print(f"decode ms/token, batch 1, fp32, {args.threads} thread(s), k = {DSA['index_topk']}")
    print(f"{'context':>8} " + " ".join(f"{name:>14}" for name in runs) + "   dense/sparse")
    for ctx in args.contexts:
        ms = [time_decode(m, ctx, args.steps) for m in runs.values()]
        print(f"{ctx:>8} " + " ".join(f"{x:>14.1f}" for x in ms) + f"   {ms[1] / ms[0]:>11.2f}x", flush=True)
    if args.transformers_contexts:
        sparse = runs["sparse (DSA)"]
        theirs = transformers_decode(sparse, args.transformers_contexts, args.steps)
        print(f"{'context':>8} {'nanoseek DSA':>14} {'transformers V3.2':>18}   transformers/nanoseek")
        for ctx, t in theirs.items():
            ours = time_decode(sparse, ctx, args.steps)
            print(f"{ctx:>8} {ours:>14.1f} {t:>18.1f}   {t / ours:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()
