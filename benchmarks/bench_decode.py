"""Decode speed: nanoseek's Engine vs transformers `generate`, same weights, one process.

    .venv/bin/python benchmarks/bench_decode.py                       # fp32, batch 1 and 8, contexts 32/512/2048
    .venv/bin/python benchmarks/bench_decode.py --batch 1 --contexts 32 2048 --repeats 5
    .venv/bin/python benchmarks/bench_decode.py --dtype bfloat16      # both libraries in bf16
    .venv/bin/python benchmarks/bench_decode.py --mtp-model runs/pretrain   # MTP acceptance and speed-up
    .venv/bin/python benchmarks/bench_decode.py --llama-cpp runs/llama_cpp --contexts 32 2048 --threads 2
    .venv/bin/python benchmarks/bench_decode.py --family v4 --batch 1 --contexts 512 4096 16384   # DeepSeek-V4
    .venv/bin/python benchmarks/bench_decode.py --family v4 --v4-filled 65536 262144 1048576       # up to 1M

Config (the inference issue's): hidden 1024, 8 layers (the first dense), 16 heads, q_lora_rank 384,
kv_lora_rank 256, qk_nope 64, qk_rope 32, v_head 64, 32 routed experts top-4 + 1 shared; the issue
leaves the vocabulary and FFN widths open, they are VOCAB / DENSE_FFN / EXPERT_FFN below.
--family v4: a DeepSeek-V4-shaped model (V4_CONFIG: V4-Flash's head size 512, rope 64, window 128,
CSA every 4 / HCA every 128 tokens after two window-only layers, index top-k 512, 4 mHC streams, hash
routing in the first layers), narrowed to 8 layers of hidden 1024; both sides prefill long prompts in
chunks (transformers: generate's prefill_chunk_size), and the cache read per step is V4's
(``estimate.v4_decode_cost``: window, HCA entries, CSA indexer keys and k chosen entries).
--v4-filled: nanoseek's V4 decode step with the cache already holding `context` tokens of random
unit-RMS entries (windows, open windows and compressed entries; a step's work depends on how many
entries it reads, not their values), so contexts up to 1M run without a prefill that would take days.

What is timed: greedy generation of --new-tokens tokens after a prompt of `context` random tokens.
Each library reports a timestamp after every forward (nanoseek: each item `Engine.stream` yields;
transformers: a logits processor, called once per step), so the prefill is left out and a step is
everything between two forwards' outputs, sampling and bookkeeping included. ms/step is the median
step (one new token for each of the batch's rows); runs alternate between the libraries.

Also printed: cache bytes per token (nanoseek: the latent formula; transformers: its cache tensors
after the run divided by the tokens held) and, for batch 1, nanoseek's speed as a fraction of the
memory-bandwidth limit: bytes of the weights one token reads (attention, dense MLP, gate, shared
expert, the K routed experts, lm_head; one embedding row) plus the latent cache it attends over,
divided by the memory bandwidth measured in this run: the higher of a large copy's (bytes read +
written, STREAM's convention) and a large sum's (bytes read), as decoding reads and hardly writes.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
import sys
import tempfile
import time
import warnings

import torch

from nanoseek import ModelConfig, Transformer, save_pretrained
from nanoseek.estimate import v4_decode_cost
from nanoseek.inference import Engine
from nanoseek.models import build_model

VOCAB, DENSE_FFN, EXPERT_FFN = 8192, 2816, 512
CONFIG = dict(model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=1024, intermediate_size=DENSE_FFN,
              num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=384,
              kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
              moe_intermediate_size=EXPERT_FFN, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
              n_group=1, topk_group=1, num_nextn_predict_layers=0, max_position_embeddings=4096,
              bos_token_id=0, eos_token_id=None)
V4_CONFIG = dict(model_type="deepseek_v4", vocab_size=VOCAB, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, q_lora_rank=384, o_groups=4, o_lora_rank=256,
                 moe_intermediate_size=EXPERT_FFN, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
                 n_group=1, topk_group=1, scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True,
                 routed_scaling_factor=1.5, swiglu_limit=10.0, window_size=128, compress_rope_theta=160000.0,
                 rope_type="yarn", rope_factor=16.0, original_max_position_embeddings=4096, beta_fast=32.0,
                 beta_slow=1.0, hc_mult=4, hc_sinkhorn_iters=20, num_hash_layers=2, index_n_heads=16,
                 index_head_dim=128, index_topk=512, compress_ratios=[0, 0, 4, 128, 4, 128, 4, 128],
                 num_nextn_predict_layers=0, max_position_embeddings=65536, bos_token_id=0, eos_token_id=None)


def memory_bandwidth(mbytes: int = 512, iters: int = 9, device: str = "cpu") -> tuple[float, float]:
    """(copy, read) bytes/s, medians of `iters`: a large tensor copy counted as bytes read + written
    (STREAM's convention), and a sum over the same tensor (bytes read). Decoding only reads weights,
    and on many CPUs reading alone is faster than the copy figure suggests: the limit uses the higher."""
    src = torch.ones(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()

    def median_time(fn):
        fn()
        times = []
        for _ in range(iters):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    return 2 * nbytes / median_time(lambda: dst.copy_(src)), nbytes / median_time(src.sum)


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def decode_bytes_per_token(model: Transformer, context: int) -> int:
    """Bytes one batch-1 decode step must read: active weights + the latent cache it attends over."""
    cfg = model.config
    size = model.model.embed_tokens.weight.element_size()
    weights = model.num_params(active=True, include_mtp=False) - model.model.embed_tokens.weight.numel() \
        + cfg.hidden_size
    if cfg.attention == "v4":
        return weights * size + int(v4_decode_cost(cfg, context, size)[0])
    cache = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * context
    return (weights + cache) * size


def nanoseek_steps(engine: Engine, prompts: list[list[int]], n: int) -> tuple[list[float], list[list[int]]]:
    stamps, outs = [], [[] for _ in prompts]
    for new in engine.stream(prompts, n + 1):
        sync(engine.device)
        stamps.append(time.perf_counter())
        for out, toks in zip(outs, new):
            out.extend(toks)
    return [b - a for a, b in zip(stamps, stamps[1:])], outs


def transformers_steps(model, prompts: torch.Tensor, n: int, chunk: int | None = None
                       ) -> tuple[list[float], list[list[int]], object]:
    stamps = []

    def stamp(input_ids, scores):  # called once per forward, before the token is picked
        sync(scores.device)
        stamps.append(time.perf_counter())
        return scores

    prompts = prompts.to(model.device)
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n + 1,
                             min_new_tokens=n + 1, do_sample=False, logits_processor=[stamp], pad_token_id=0,
                             return_dict_in_generate=True, **({"prefill_chunk_size": chunk} if chunk else {}))
    new = out.sequences[:, prompts.shape[1]:].tolist()
    return [b - a for a, b in zip(stamps, stamps[1:])], new, out.past_key_values


def cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers Cache object holds."""
    seen, total = set(), 0
    for layer in getattr(cache, "layers", []):
        values = list(vars(layer).values())
        values += [v for d in values if isinstance(d, dict) for v in d.values()]  # V4: per-compressor states
        for t in values:
            if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def llama_cpp_report(contexts: list[int], new_tokens: int, repeats: int, threads: int, workdir: Path) -> None:
    """Batch-1 greedy decode, nanoseek fp32 / int8 / int4 beside llama.cpp f32 / Q8_0 / Q4_0 on the
    same random weights (the checkpoint converted by llama.cpp's own converter, then its quantizer),
    runs alternating; median ms per token and the ratio nanoseek / llama.cpp (below 1: nanoseek faster)."""
    from llama_cpp_side import decode_steps, to_gguf

    from nanoseek.quant import quantize_model
    from nanoseek.tokenizer import Tokenizer
    torch.set_num_threads(threads)
    ckpt = workdir / "checkpoint"
    if not (ckpt / "config.json").exists():
        torch.manual_seed(0)
        save_pretrained(Transformer(ModelConfig(**CONFIG)), ckpt)
        words = "the model reads every token once and writes its latent into the cache".split()
        Tokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 50, vocab_size=1000
                        ).save_pretrained(ckpt)
    from nanoseek.hf import load_pretrained
    pairs = [("fp32", "f32", None), ("int8", "q8_0", "int8"), ("int4", "q4_0", "int4")]
    print(f"llama.cpp (llama-cpp-python {__import__('llama_cpp').__version__}) and nanoseek, {threads} threads, batch 1, "
          f"greedy, {new_tokens} tokens after a random prompt; median ms/token of {repeats} alternating runs")
    print(f"{'precision':>10}{'context':>9}{'nanoseek':>10}{'llama.cpp':>11}{'ratio':>8}{'same tokens':>13}")
    gen = torch.Generator().manual_seed(0)
    for ours, theirs, quant in pairs:
        model = load_pretrained(ckpt, dtype=torch.float32)
        if quant:
            quantize_model(model, quant, group_size=32)
        engine, gguf = Engine(model), to_gguf(ckpt, workdir / "gguf", theirs, threads)
        for context in contexts:
            prompt = torch.randint(3, VOCAB, (context,), generator=gen).tolist()
            ours_t, theirs_t, same = [], [], None
            for _ in range(repeats):
                steps, ours_out = nanoseek_steps(engine, [prompt], new_tokens)
                ours_t += steps
                steps, theirs_out = decode_steps(gguf, prompt, new_tokens + 1, threads)
                theirs_t += steps[:-1]
                same = ours_out[0][:new_tokens] == theirs_out[:new_tokens]
            a, b = statistics.median(ours_t), statistics.median(theirs_t)
            print(f"{ours + '/' + theirs:>10}{context:>9}{a * 1e3:>10.2f}{b * 1e3:>11.2f}{a / b:>7.2f}x{str(same):>13}",
                  flush=True)


def v4_filled_report(contexts: list[int], steps: int, dtype: torch.dtype) -> None:
    """V4 decode ms/token at long contexts over a pre-filled compressed cache, beside the estimate's bytes."""
    from nanoseek.inference.compressed import CompressedCache
    torch.manual_seed(0)
    model = build_model(ModelConfig(**V4_CONFIG)).eval().to(dtype)
    engine = Engine(model)
    size = model.model.embed_tokens.weight.element_size()
    read_bw = max(memory_bandwidth())
    print(f"V4 decode over a filled cache, {torch.get_num_threads()} threads, {dtype}, read bandwidth "
          f"{read_bw / 1e9:.1f} GB/s")
    print(f"{'context':>9}{'ms/token':>10}{'cache read/step':>17}{'cache held':>12}{'BW limit':>10}")
    for ctx in contexts:
        cache = CompressedCache(model.config, 1, ctx + steps + 2, dtype)
        cache.reserve(0, ctx + steps + 2)
        for t in (cache.win, *cache.pending.values(), *(p for parts in cache.comp.values() for p in parts)):
            t.normal_()
        token, times = torch.tensor([[5]]), []
        with torch.inference_mode():
            for i in range(steps + 1):
                t0 = time.perf_counter()
                token = engine.logits(engine.decode(token, torch.tensor([[ctx + i]]), cache)[:, -1:]).argmax(-1)
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times[1:]) * 1e3
        limit = decode_bytes_per_token(model, ctx) / read_bw * 1e3
        print(f"{ctx:>9,}{ms:>10.1f}{v4_decode_cost(model.config, ctx, size)[0] / 2**20:>14.1f} MB"
              f"{cache.nbytes / 2**30:>10.2f} GB{limit / ms:>10.0%}", flush=True)
        del cache


def speculative_report(path: str, n_prompts: int, new_tokens: int, repeats: int) -> None:
    """Plain vs MTP-speculative greedy decoding on a trained checkpoint, prompts from the test split
    of the built-in task it was trained on (arithmetic), written as its pretraining documents start."""
    from nanoseek.hf import load_pretrained
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(path)
    engine = Engine(load_pretrained(path), tok)
    examples = get_task("arithmetic").examples("test", n_prompts, seed=0)
    prompts = [tok.encode(f"{ex.prompt}\n<think>\n", add_bos=True) for ex in examples]
    times = {None: [], "mtp": []}
    outs, stats = {}, {}
    for _ in range(repeats):
        for mode in times:
            for p in prompts:  # batch 1, as the target is stated
                t = time.perf_counter()
                outs.setdefault(mode, []).append(engine.generate([p], new_tokens, speculative=mode)[0].tokens)
                times[mode].append((time.perf_counter() - t) / len(outs[mode][-1]))
                for k in ("accepted", "drafted", "new_tokens", "row_forwards"):
                    stats.setdefault(mode, {}).setdefault(k, 0)
                    stats[mode][k] += engine.stats[k]
    s = stats["mtp"]
    plain, spec = statistics.median(times[None]), statistics.median(times["mtp"])
    print(f"MTP speculative decoding on {path}: {len(prompts)} prompts x {repeats}, up to {new_tokens} tokens, "
          f"batch 1, greedy")
    print(f"  same tokens as plain greedy: {outs[None] == outs['mtp']}; acceptance {s['accepted'] / s['drafted']:.1%}; "
          f"{s['new_tokens'] / s['row_forwards']:.2f} tokens per forward")
    print(f"  ms/token (prefill included): plain {plain * 1e3:.2f}, speculative {spec * 1e3:.2f}, "
          f"speed-up {plain / spec:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--contexts", type=int, nargs="+", default=[32, 512, 2048], help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per library and setting (alternating)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (transformers runs on the same device)")
    p.add_argument("--no-transformers", action="store_true", help="time nanoseek alone")
    p.add_argument("--compile", action="store_true", help="nanoseek's decode step through torch.compile")
    p.add_argument("--llama-cpp", default=None, metavar="WORKDIR",
                   help="batch-1 decode beside llama.cpp (fp32/f32, int8/Q8_0, int4/Q4_0) on the same weights; "
                        "checkpoint and GGUF files are kept in WORKDIR")
    p.add_argument("--family", default="v3", choices=["v3", "v4"], help="the model shape: CONFIG or V4_CONFIG")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="transformers' prefill_chunk_size (default: 1024 for v4, none for v3)")
    p.add_argument("--v4-filled", type=int, nargs="*", default=None, metavar="CONTEXT",
                   help="V4 decode over a cache pre-filled to these contexts (no prefill, nanoseek alone)")
    p.add_argument("--mtp-model", default=None,
                   help="a trained checkpoint with an MTP module: report speculative decoding on it and exit")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.llama_cpp:
        llama_cpp_report(args.contexts, args.new_tokens, args.repeats, args.threads or 2, Path(args.llama_cpp))
        return 0
    if args.v4_filled:
        v4_filled_report(args.v4_filled, args.new_tokens, getattr(torch, args.dtype))
        return 0
    if args.mtp_model:
        speculative_report(args.mtp_model, n_prompts=8, new_tokens=args.new_tokens * 8, repeats=args.repeats)
        return 0
    dtype = getattr(torch, args.dtype)
    import transformers

    torch.manual_seed(0)
    ours = build_model(ModelConfig(**(V4_CONFIG if args.family == "v4" else CONFIG))).eval()
    chunk = args.prefill_chunk or (1024 if args.family == "v4" else None)
    ref = None
    if not args.no_transformers:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_pretrained(ours, d)
            ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval().to(args.device)
    ours = ours.to(dtype).to(args.device)
    engine = Engine(ours, compile=args.compile)
    copy_bw, read_bw = memory_bandwidth(device=args.device)
    bandwidth = max(copy_bw, read_bw)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, {ours.num_params() / 1e6:.0f}M params ({ours.num_params(active=True) / 1e6:.0f}M active), "
          f"bandwidth: copy {copy_bw / 1e9:.1f} GB/s, read {read_bw / 1e9:.1f} GB/s")
    print(f"{'batch':>5}{'context':>8}{'nanoseek ms/step':>18}{'transformers ms/step':>22}{'ratio':>8}"
          f"{'cache B/token ours':>20}{'theirs':>8}{'BW limit':>10}{'same tokens':>13}")
    gen = torch.Generator().manual_seed(0)
    for batch in args.batch:
        for context in args.contexts:
            prompts = torch.randint(1, VOCAB, (batch, context), generator=gen)
            ours_t, ref_t, theirs_bytes, same, bws = [], [], None, None, []
            for _ in range(args.repeats):
                bws.append(max(memory_bandwidth(iters=3, device=args.device)))  # sampled between runs: the machine's load varies
                steps, ours_out = nanoseek_steps(engine, prompts.tolist(), args.new_tokens)
                ours_t += steps
                if ref is not None:
                    steps, ref_out, cache = transformers_steps(ref, prompts, args.new_tokens, chunk)
                    ref_t += steps
                    held = cache.get_seq_length() * batch
                    theirs_bytes = cache_bytes(cache) // held
                    same = ours_out == ref_out
                    del cache
            t_ours = statistics.median(ours_t)
            t_ref = statistics.median(ref_t) if ref_t else float("nan")
            limit = decode_bytes_per_token(ours, context) / statistics.median(bws)
            bw = f"{limit / t_ours:.0%}" if batch == 1 else "-"
            print(f"{batch:>5}{context:>8}{t_ours * 1e3:>18.1f}{t_ref * 1e3:>22.1f}{t_ref / t_ours:>7.2f}x"
                  f"{engine.cache_bytes_per_token():>20,}{theirs_bytes or 0:>8,}{bw:>10}{str(same):>13}")
            sys.stdout.flush()
    print(f"bandwidth limit at batch 1, context 32: {decode_bytes_per_token(ours, 32) / bandwidth * 1e3:.1f} ms/token "
          f"({decode_bytes_per_token(ours, 32) / 1e6:.0f} MB read per token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
