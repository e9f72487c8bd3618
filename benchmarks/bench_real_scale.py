"""DeepSeek-V2-Lite at its real size on this machine: quantize on load, decode, serve, MTP, beside llama.cpp.

    python benchmarks/bench_real_scale.py --prepare-only            # shards, GGUFs, MTP variant (long, untimed)
    python benchmarks/bench_real_scale.py                           # every step (checkpoints reused)
    python benchmarks/bench_real_scale.py --layers 2 --steps decode serve mtp   # V2-Lite's widths, 2 layers
    python benchmarks/bench_real_scale.py --steps decode llama-cpp --formats int4

The checkpoint is V2-Lite's published config (the `deepseek-v2-lite` preset: 15.7B parameters, 27
layers, 64 routed experts top-6 + 2 shared, MLA with kv_lora_rank 512) with random bf16 weights,
written as shards the way the real checkpoint is laid out, once, into --cache (reruns reuse it, and
everything derived from it). Each nanoseek and llama.cpp step runs in its own process, so peak RSS
is that step's alone; the same random prompt ids (seed 0) go to both libraries:

1. decode: quantize on load to int4 and int8 (``load_pretrained(quantize=, group_size=64)``; 64 as
   the dense FFN's 10,944 inputs are not a multiple of 128): seconds and peak RSS; then batch-1
   greedy decode at contexts 128 and 4,096: ms/token (median step).
2. llama-cpp: the same checkpoint through llama.cpp's own converter (from the llama-cpp-python
   source distribution, ``llama_cpp_side.py``) straight to Q8_0 (`--outtype q8_0`: an f32 GGUF
   would be 63 GB, more than the disk holds beside the shards), and Q4_0 requantized from that Q8_0
   by llama.cpp's quantizer (allow_requantize; as `llama-quantize` does for Q4_0, the output head is
   Q6_K). Both GGUFs are kept beside the checkpoint (`<checkpoint>-gguf`, written as .partial and
   renamed). Decode at the same contexts with the weights read into memory (no mmap), printed beside
   nanoseek's int8 / int4 with the speed ratio, and each one's fraction of the bandwidth limit:
   active weight bytes per token (attention, dense first layer, shared experts, 6 of 64 routed
   experts, gate, head, one embedding row; each library's own stored bytes) / read bandwidth
   measured in its process (bench_decode's ``memory_bandwidth``). Targets: int4 >= 1.0x Q4_0 and
   int8 >= 1.0x Q8_0 tokens/s, >= 60% of the bandwidth limit.
3. serve: `nanoseek serve --quantize int4 --group-size 64` as a subprocess; its RSS once /health
   answers against the target (quantized weights + --serve-kv + 1 GiB; the prefix cache off), then
   --streams (8) concurrent streamed /v1/completions of --serve-prompt (2,048) random token ids and
   --serve-tokens new tokens each: time to first token per stream, aggregate tokens/s, the median
   gap between a stream's tokens, tokens/s while all streams decode, and the server's peak RSS.
4. mtp: a variant with one MTP module (`<checkpoint>-mtp`: links to the shards plus one shard of
   the MTP layer, ~1.2 GB, not a copy of the 29 GB). At int4 and int8 and each --mtp-contexts
   (default 128), the cost of a plain decode step (forward + head) against a speculative step: the
   main model on [last, draft] (2 tokens: with top-6 routing they may read up to twice the routed
   experts) + the MTP module's draft forward and head. Random weights accept no drafts, so the
   speed-up is predicted at --acceptance a: (1 + a) x plain / (verify + draft), and again with the
   draft on 2 tokens after an accepted one.
Figures go into BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.hf.io import write_index
from nanoseek.hf.keys import hf_state_dict, is_mtp_shared_copy, natural_key

CACHE = Path.home() / ".cache" / "nanoseek" / "bench_real_scale"


# ----------------------------------------------------------------------------- the random checkpoints

def random_tensor(key: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if key.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=torch.float32)
    return torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=gen).to(torch.bfloat16)


def write_shards(shapes: dict[str, tuple], folder: Path, seed: int, prefix: str = "model",
                 shard_bytes: int = 2 << 30) -> tuple[dict[str, str], int]:
    """Random tensors of `shapes` into `folder` as safetensors shards, a few at a time (never the
    whole model in memory); returns (key -> shard name, bytes)."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(shapes, key=natural_key)
    shard, size, weight_map, total, n = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"{prefix}-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0
    for i, key in enumerate(keys):
        t = shard[key] = random_tensor(key, shapes[key], gen)
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
            print(f"  wrote {total / 2**30:.1f} GiB ({i + 1}/{len(keys)} tensors)", flush=True)
    if shard:
        flush()
    return weight_map, total


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(t.shape) for k, t in hf_state_dict(Transformer(cfg)).items()}


def write_random_checkpoint(cfg: ModelConfig, path: Path) -> None:
    """Random bf16 weights for `cfg` as safetensors shards + index and a small tokenizer, written
    beside and renamed into place when complete (an existing checkpoint is kept)."""
    from nanoseek.tokenizer import Tokenizer
    if (path / "model.safetensors.index.json").exists():
        return
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    weight_map, total = write_shards(checkpoint_shapes(cfg), tmp, seed=0)
    write_index(tmp, weight_map, total)
    (tmp / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "bfloat16"}, indent=2))
    words = "the model reads every token once and writes its latent into the cache".split()
    Tokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 50, vocab_size=1000
                    ).save_pretrained(tmp)
    tmp.rename(path)


def write_mtp_variant(cfg: ModelConfig, base: Path, path: Path) -> None:
    """`base` with one MTP module: a folder whose shards are links to base's, plus one shard with
    the MTP layer's random weights (its copies of the embedding and head are left out: the model
    shares its own), an index over both, and the config with num_nextn_predict_layers = 1."""
    if (path / "model.safetensors.index.json").exists():
        return
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for name in sorted(set(weight_map.values())):
        (tmp / name).symlink_to(Path("..") / base.name / name)
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("model.safetensors.index.json", "config.json"):
            shutil.copy(f, tmp / f.name)
    mtp_cfg = cfg.replace(num_nextn_predict_layers=1)
    extra = {k: v for k, v in checkpoint_shapes(mtp_cfg).items()
             if k not in weight_map and not is_mtp_shared_copy(mtp_cfg, k)}
    added, _ = write_shards(extra, tmp, seed=1, prefix="mtp")
    total = sum((base / n).stat().st_size for n in set(weight_map.values()))
    total += sum((tmp / n).stat().st_size for n in set(added.values()))
    write_index(tmp, {**weight_map, **added}, total)
    (tmp / "config.json").write_text(json.dumps({**mtp_cfg.to_hf(), "torch_dtype": "bfloat16"}, indent=2))
    tmp.rename(path)


def prompt_ids(vocab: int, contexts: list[int]) -> dict[int, list[int]]:
    """The random prompt of each context length, the same for every step and library."""
    gen = torch.Generator().manual_seed(0)
    return {ctx: torch.randint(3, vocab, (ctx,), generator=gen).tolist() for ctx in contexts}


def active_weight_bytes(model) -> tuple[int, int]:
    """(bytes of all the main model's weights as held, bytes one batch-1 decode step reads): every
    tensor, the routed experts at top-k of n, one row of the embedding; the MTP module left out."""
    cfg, total, active = model.config, 0, 0
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if "rotary" in name or (layer and int(layer[1]) >= cfg.num_hidden_layers):
            continue
        size = t.numel() * t.element_size()
        total += size
        if ".mlp.experts." in name:
            size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif "embed_tokens" in name:
            size //= t.shape[0]
        active += size
    return total, active


# ----------------------------------------------------------------------------- steps, each in a child process

def child(step: str, args: argparse.Namespace, **kw) -> dict:
    """Run `step` in a fresh Python process; returns its JSON result (its last line of output)."""
    cmd = [sys.executable, __file__, "--child", step, "--child-args", json.dumps({**vars(args), **kw})]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_bandwidth() -> float:
    """Bytes/s of memory read, bench_decode's measurement (the higher of a large copy's and a large sum's)."""
    from bench_decode import memory_bandwidth
    return max(memory_bandwidth())


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_load_and_decode(a: dict) -> dict:
    """nanoseek: quantize on load (seconds, peak RSS), then batch-1 greedy decode at each context."""
    from nanoseek.hf import load_pretrained
    from nanoseek.inference import Engine
    torch.set_num_threads(a["threads"])
    bw = read_bandwidth()  # before the load: its buffers are freed, so ru_maxrss stays the load's
    t0 = time.perf_counter()
    model = load_pretrained(a["path"], quantize=a["format"] if a["format"] != "bf16" else None, group_size=64)
    load_s = time.perf_counter() - t0
    total, active = active_weight_bytes(model)
    engine = Engine(model)
    out = {"load_s": load_s, "peak_rss_load": peak_rss(), "read_bw": bw, "weight_bytes": total, "active_bytes": active}
    for ctx, prompt in prompt_ids(model.config.vocab_size, a["contexts"]).items():
        stamps = []
        for _ in engine.stream([prompt], a["new_tokens"] + 1):
            stamps.append(time.perf_counter())
        out[f"ms_per_token_{ctx}"] = statistics.median(y - x for x, y in zip(stamps, stamps[1:])) * 1e3
    out["peak_rss"] = peak_rss()
    return out


def step_llama_cpp(a: dict) -> dict:
    """llama.cpp: the GGUF read into memory (no mmap, as nanoseek holds its weights), then batch-1
    greedy decode at each context on the same prompts; active bytes from the GGUF's own tensors."""
    from llama_cpp_side import decode_steps, gguf_tensor_bytes, load_llama
    cfg = ModelConfig.from_hf(a["path"])
    bw = read_bandwidth()
    total = active = 0
    for name, size in gguf_tensor_bytes(Path(a["gguf"])).items():
        total += size
        if "_exps." in name:
            size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif name.startswith("token_embd."):
            size //= cfg.vocab_size
        active += size
    t0 = time.perf_counter()
    llm = load_llama(Path(a["gguf"]), max(a["contexts"]) + a["new_tokens"] + 8, a["threads"], use_mmap=False)
    out = {"load_s": time.perf_counter() - t0, "read_bw": bw, "weight_bytes": total, "active_bytes": active}
    for ctx, prompt in prompt_ids(cfg.vocab_size, a["contexts"]).items():
        steps, _ = decode_steps(Path(a["gguf"]), prompt, a["new_tokens"], a["threads"], llm=llm)
        out[f"ms_per_token_{ctx}"] = statistics.median(steps) * 1e3
    out["peak_rss"] = peak_rss()
    return out


def step_mtp(a: dict) -> dict:
    """Costs of MTP self-speculation on the MTP variant: plain decode steps, then speculative ones,
    each split into the main model's forward (1 token, or [last, draft]: 2) with its head, and the
    MTP module's forward with its head. Random weights reject every draft, so the MTP module reads
    one token per step; its cost on 2 (the step after an accepted draft) is timed beside it."""
    from nanoseek.hf import load_pretrained
    from nanoseek.inference import Engine
    torch.set_num_threads(a["threads"])
    engine = Engine(load_pretrained(a["path"], quantize=a["format"], group_size=64))
    times: dict[str, list[float]] = {}
    phase = [None]
    forward, mtp_forward, logits = engine.forward, engine.mtp_forward, engine.logits

    def timed(what, fn, *args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        times.setdefault(what, []).append(time.perf_counter() - t)
        return out

    def forward_timed(ids, positions, cache, absorb, inputs_embeds=None):
        if not absorb or ids.shape[1] > 2:  # prefill
            phase[0] = None
            return forward(ids, positions, cache, absorb, inputs_embeds)
        phase[0] = "verify" if ids.shape[1] == 2 else "plain"
        return timed(phase[0], forward, ids, positions, cache, absorb, inputs_embeds)

    def mtp_timed(hidden, next_ids, positions, cache, absorb):
        if hidden.shape[1] == 1 and absorb:  # the module on 2 tokens, as after an accepted draft; then the real call
            two = positions[:, :1] + torch.arange(2)
            timed("mtp_on_2", mtp_forward, hidden.expand(-1, 2, -1), next_ids.expand(-1, 2), two, cache, absorb)
        phase[0] = "mtp" if absorb else None
        return (timed("mtp", mtp_forward, hidden, next_ids, positions, cache, absorb) if absorb
                else mtp_forward(hidden, next_ids, positions, cache, absorb))

    def logits_timed(hidden):
        if phase[0] is None:
            return logits(hidden)
        return timed(phase[0] + "_head", logits, hidden)
    engine.forward, engine.mtp_forward, engine.logits = forward_timed, mtp_timed, logits_timed
    out = {}
    for ctx, prompt in prompt_ids(engine.config.vocab_size, a["mtp_contexts"]).items():
        steps: dict[str, list[float]] = {}
        parts: dict[str, list[float]] = {}
        for _ in range(a["mtp_repeats"]):  # the modes alternate, so a slow spell of the machine hits both
            for mode in (None, "mtp"):
                times.clear()
                stamps = []
                for _ in engine.stream([prompt], a["new_tokens"] + 1, speculative=mode):
                    stamps.append(time.perf_counter())
                steps.setdefault(mode or "plain", []).extend(y - x for x, y in zip(stamps, stamps[1:]))
                for what, ts in times.items():
                    parts.setdefault(what, []).extend(ts[1:])
                if mode:
                    out[f"acceptance_{ctx}"] = engine.stats["acceptance_rate"]
        out.update({f"{k}_step_{ctx}": statistics.median(v) for k, v in steps.items()})
        out.update({f"{k}_{ctx}": statistics.median(v) for k, v in parts.items()})
    out["peak_rss"] = peak_rss()
    return out


# ----------------------------------------------------------------------------- nanoseek serve

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


async def stream_completion(client, model: str, prompt: list[int], max_tokens: int, t0: float) -> list[float]:
    """One streamed /v1/completions request with a token-id prompt: the time (from t0) of each token.
    logprobs=0 makes every token an event, text or not (the tokenizer trained here has 1,000 tokens;
    the random model's picks are mostly outside it and decode to nothing)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "logprobs": 0}
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"the server failed a request: {event['error']}")
                n = len(((event["choices"] or [{}])[0].get("logprobs") or {}).get("tokens") or [])
                stamps += [time.perf_counter() - t0] * n
    return stamps


def step_serve(args: argparse.Namespace, path: Path, fmt: str, weight_bytes: int) -> dict:
    """`nanoseek serve` on the checkpoint in its own process: RSS once /health answers, then
    --streams concurrent streamed requests of --serve-prompt random token ids each."""
    import asyncio
    import tempfile

    import httpx
    from bench_serve import free_port, wait_until_up

    from nanoseek.hf.io import parse_size
    port = free_port()
    context = args.serve_prompt + args.serve_tokens + 16
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(path), "--port", str(port), "--quantize", fmt,
           "--group-size", "64", "--kv-cache-memory", args.serve_kv, "--context", str(context),
           "--max-batch", str(args.streams), "--max-num-batched-tokens", str(args.serve_batched_tokens),
           "--prefix-cache-mb", "0"]
    base, out = f"http://127.0.0.1:{port}", {}
    log = tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    try:
        wait_until_up(base, server, timeout=3600, log=log, poll_s=1.0)  # a real-scale load takes minutes
        out["start_s"] = time.perf_counter() - t0
        out["rss_start"] = proc_status(server.pid)["VmRSS"]
        out["rss_bound"] = weight_bytes + parse_size(args.serve_kv, "--serve-kv") + (1 << 30)
        gen = torch.Generator().manual_seed(1)
        vocab = ModelConfig.from_hf(path).vocab_size
        prompts = [torch.randint(3, vocab, (args.serve_prompt,), generator=gen).tolist() for _ in range(args.streams)]

        async def run_all():
            async with httpx.AsyncClient(base_url=base, timeout=None,
                                         limits=httpx.Limits(max_connections=args.streams)) as client:
                t = time.perf_counter()
                return await asyncio.gather(*(stream_completion(client, path.name, p, args.serve_tokens, t) for p in prompts))
        stamps = asyncio.run(run_all())
        out["rss_peak"] = proc_status(server.pid)["VmHWM"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    tokens = sum(len(s) for s in stamps)
    if tokens != args.streams * args.serve_tokens:
        raise RuntimeError(f"expected {args.streams} x {args.serve_tokens} tokens, got {[len(s) for s in stamps]}")
    first, wall = [s[0] for s in stamps], max(s[-1] for s in stamps)
    # all streams decoding together: from the last first token to the first last token
    lo, hi = max(first), min(s[-1] for s in stamps)
    together = sum(lo < t <= hi for s in stamps for t in s)
    gaps = [y - x for st in stamps for x, y in zip(st, st[1:])]
    out.update(ttft=sorted(first), wall_s=wall, tokens_per_s=tokens / wall, gap_ms=statistics.median(gaps) * 1e3,
               decode_tokens_per_s=together / (hi - lo) if hi > lo else None)
    return out


# ----------------------------------------------------------------------------- reports

def report_llama_cpp(args: argparse.Namespace, path: Path, ours: dict, ggufs: dict) -> None:
    """llama.cpp's decode beside nanoseek's, same weights and prompts, with each one's fraction of the
    bandwidth limit (its own active bytes per token / the read bandwidth measured in its process)."""
    print(f"{'format':>12}{'context':>9}{'nanoseek ms':>13}{'llama.cpp ms':>14}{'speed ratio':>13}"
          f"{'BW limit: ours':>16}{'theirs':>8}")
    for fmt in args.formats:
        kind = {"int8": "Q8_0", "int4": "Q4_0"}[fmt]
        r, o = child("step_llama_cpp", args, path=str(path), gguf=str(ggufs[fmt])), ours[fmt]
        print(f"llama.cpp {kind}: weights {gib(r['weight_bytes'])}, {r['active_bytes'] / 1e9:.2f} GB read per token "
              f"(nanoseek {fmt}: {o['active_bytes'] / 1e9:.2f} GB); read bandwidth {r['read_bw'] / 1e9:.1f} GB/s "
              f"(nanoseek's run: {o['read_bw'] / 1e9:.1f})", flush=True)
        for c in args.contexts:
            a, b = o[f"ms_per_token_{c}"], r[f"ms_per_token_{c}"]
            ours_bw = o["active_bytes"] / o["read_bw"] * 1e3 / a
            theirs_bw = r["active_bytes"] / r["read_bw"] * 1e3 / b
            print(f"{fmt + '/' + kind:>12}{c:>9}{a:>13.1f}{b:>14.1f}{b / a:>12.2f}x{ours_bw:>16.0%}{theirs_bw:>8.0%}",
                  flush=True)
    print("  speed ratio: nanoseek tokens/s over llama.cpp's (target >= 1.0); BW limit: active weight bytes "
          "per token / read bandwidth, as a fraction of the measured ms/token (target >= 60%; cache reads "
          "at long context not counted)")


def report_mtp(args: argparse.Namespace, path: Path) -> None:
    """Plain decode step vs speculative verify + draft at each format and context, and the speed-up
    they predict at the given acceptance rates."""
    for fmt in args.formats:
        r = child("step_mtp", args, path=str(path), format=fmt)
        for c in args.mtp_contexts:
            plain = r[f"plain_{c}"] + r[f"plain_head_{c}"]
            verify = r[f"verify_{c}"] + r[f"verify_head_{c}"]
            mtp1, mtp2 = r[f"mtp_{c}"] + r[f"mtp_head_{c}"], r[f"mtp_on_2_{c}"] + r[f"mtp_head_{c}"]
            whole = r[f"mtp_step_{c}"] - r[f"mtp_on_2_{c}"]  # the stream's step less the extra timing call
            print(f"MTP {fmt}, context {c}: plain step {plain * 1e3:.1f} ms (whole step {r[f'plain_step_{c}'] * 1e3:.1f}); "
                  f"verify on 2 tokens {verify * 1e3:.1f} ms ({verify / plain:.2f}x), MTP draft {mtp1 * 1e3:.1f} ms "
                  f"(on 2 tokens {mtp2 * 1e3:.1f}); whole speculative step {whole * 1e3:.1f} ms "
                  f"({whole / r[f'plain_step_{c}']:.2f}x); acceptance here {r[f'acceptance_{c}']:.0%} (random weights)")
            for a in args.acceptance:
                simple = (1 + a) * plain / (verify + mtp1)
                step = verify + (1 - a) * mtp1 + a * mtp2  # the module reads 2 tokens after an accepted draft
                print(f"  acceptance {a:.0%}: predicted speed-up {simple:.2f}x ((1+a) x plain / (verify + draft)); "
                      f"{(1 + a) * plain / step:.2f}x with the draft on 2 tokens after an accepted one; "
                      f"{(1 + a) * r[f'plain_step_{c}'] / whole:.2f}x from the whole steps", flush=True)


# ----------------------------------------------------------------------------- the run

def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(CACHE), help="folder for the random checkpoints and GGUFs (written once)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than V2-Lite's 27 (a quick check)")
    ap.add_argument("--formats", nargs="+", default=["int4", "int8"], choices=["int4", "int8"],
                    help="quantize-on-load formats to measure (llama.cpp: Q4_0 beside int4, Q8_0 beside int8)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 4096], help="prompt lengths for decode")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per context")
    ap.add_argument("--threads", type=int, default=2, help="threads for every library and the server")
    ap.add_argument("--steps", nargs="+", default=["decode", "llama-cpp", "serve", "mtp"],
                    choices=["decode", "llama-cpp", "serve", "mtp"],
                    help="which steps to run (the checkpoint is written first whatever they are)")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="leave out the llama.cpp step")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the checkpoints and GGUFs (the long, untimed part) and stop")
    ap.add_argument("--streams", type=int, default=8, help="serve: concurrent streaming requests")
    ap.add_argument("--serve-prompt", type=int, default=2048, help="serve: prompt tokens per request (random ids)")
    ap.add_argument("--serve-tokens", type=int, default=64,
                    help="serve: new tokens per request (enough that all streams decode together for a while: "
                         "the first ones start while the later prompts are still being prefilled)")
    ap.add_argument("--serve-kv", default="1GB", help="serve: --kv-cache-memory (the RSS bound counts it)")
    ap.add_argument("--serve-batched-tokens", type=int, default=512, help="serve: --max-num-batched-tokens")
    ap.add_argument("--serve-format", default="int4", choices=["int4", "int8"], help="serve: --quantize")
    ap.add_argument("--mtp-contexts", type=int, nargs="+", default=[128],
                    help="mtp: prompt lengths (each a prefill per mode and format: 4,096 adds minutes; at long "
                         "context the 2 verify tokens share one read of the cache, so 128 is the harder case)")
    ap.add_argument("--mtp-repeats", type=int, default=3, help="mtp: alternating plain / speculative runs per context")
    ap.add_argument("--acceptance", type=float, nargs="+", default=[0.94, 0.85, 0.90],
                    help="mtp: acceptance rates to predict the speed-up at (0.94: the demo's trained model in "
                         "BENCHMARKS.md; 0.85-0.90: DeepSeek-V3's report)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        steps = {"step_load_and_decode": step_load_and_decode, "step_llama_cpp": step_llama_cpp, "step_mtp": step_mtp}
        print(json.dumps(steps[args.child](json.loads(args.child_args))))
        return 0
    from llama_cpp_side import to_gguf
    cfg = ModelConfig.preset("deepseek-v2-lite")
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    path = Path(args.cache) / f"v2-lite-{cfg.num_hidden_layers}layers"
    t0 = time.perf_counter()
    write_random_checkpoint(cfg, path)
    print(f"checkpoint {path}: {gib(sum(f.stat().st_size for f in path.glob('*.safetensors')))} "
          f"({time.perf_counter() - t0:.0f} s), {args.threads} threads", flush=True)
    llama = "llama-cpp" in args.steps and not args.skip_llama_cpp
    ggufs = {}
    if llama or args.prepare_only:
        for fmt, kind in (("int8", "q8_0"), ("int4", "q4_0")):
            if fmt in args.formats:
                t0 = time.perf_counter()
                ggufs[fmt] = to_gguf(path, path.with_name(path.name + "-gguf"), kind, args.threads, via="q8_0")
                print(f"llama.cpp {kind.upper()}: {ggufs[fmt]} ({gib(ggufs[fmt].stat().st_size)}, "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
    mtp_path = path.with_name(path.name + "-mtp")
    if "mtp" in args.steps or args.prepare_only:
        write_mtp_variant(cfg, path, mtp_path)
    if args.prepare_only:
        return 0
    ours = {}
    for fmt in args.formats if "decode" in args.steps or llama or "serve" in args.steps else []:
        r = ours[fmt] = child("step_load_and_decode", args, path=str(path), format=fmt)
        ctx = ", ".join(f"{c}: {r[f'ms_per_token_{c}']:.1f} ms/token" for c in args.contexts)
        print(f"nanoseek {fmt}: load {r['load_s']:.0f} s, peak RSS {gib(r['peak_rss_load'])} (weights "
              f"{gib(r['weight_bytes'])}, {r['active_bytes'] / 1e9:.2f} GB read per token); decode {ctx}", flush=True)
    if llama:
        report_llama_cpp(args, path, ours, ggufs)
    if "serve" in args.steps:
        weights = ours[args.serve_format]["weight_bytes"] if args.serve_format in ours else \
            child("step_load_and_decode", args, path=str(path), format=args.serve_format, contexts=[])["weight_bytes"]
        r = step_serve(args, path, args.serve_format, weights)
        print(f"nanoseek serve ({args.serve_format}, KV {args.serve_kv}): up in {r['start_s']:.0f} s, RSS at start "
              f"{gib(r['rss_start'])} (bound: weights + KV + 1 GiB = {gib(r['rss_bound'])}: "
              f"{'met' if r['rss_start'] <= r['rss_bound'] else 'MISSED'}), peak {gib(r['rss_peak'])}", flush=True)
        print(f"  {args.streams} streams x {args.serve_prompt}-token prompts, {args.serve_tokens} tokens each: "
              f"first tokens at {', '.join(f'{t:.1f}' for t in r['ttft'])} s; {r['wall_s']:.0f} s in all "
              f"({r['tokens_per_s']:.2f} tokens/s); median gap between a stream's tokens {r['gap_ms']:.0f} ms; "
              + (f"{r['decode_tokens_per_s']:.2f} tokens/s while all {args.streams} decode" if r["decode_tokens_per_s"]
                 else "the streams never all decoded at once (raise --serve-tokens)"), flush=True)
    if "mtp" in args.steps:
        report_mtp(args, mtp_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
