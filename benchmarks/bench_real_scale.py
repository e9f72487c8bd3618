"""DeepSeek-V2-Lite at its real size on this machine: quantize on load, decode, serve, beside llama.cpp.

    python benchmarks/bench_real_scale.py                           # the whole run (~31 GB of shards, written once)
    python benchmarks/bench_real_scale.py --layers 4                # V2-Lite's widths, 4 layers: a quick check
    python benchmarks/bench_real_scale.py --skip-llama-cpp --formats int4

The checkpoint is V2-Lite's published config (the `deepseek-v2-lite` preset: 15.7B parameters, 27
layers, 64 routed experts top-6 + 2 shared, MLA with kv_lora_rank 512) with random bf16 weights,
written as shards the way the real checkpoint is laid out, once, into --cache (reruns reuse it).
Each step runs in its own process, so peak RSS is that step's alone:

1. quantize on load to int4 and int8 (``load_pretrained(quantize=)``): seconds and peak RSS (the
   target is under 20 GB on this 24 GB machine);
2. batch-1 greedy decode at contexts 128 and 4,096: ms/token (median step).
Not built yet (the issue's other two steps): `nanoseek serve` on these weights (RSS at start, 8
concurrent streams with 2k-token prompts) and llama.cpp on the same weights (its converter from the
llama-cpp-python source distribution to Q8_0, then Q4_0; ``llama_cpp_side.py`` has both for the
small config); --skip-llama-cpp is accepted for when it is.
Figures go into BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.hf.io import write_index
from nanoseek.hf.keys import hf_state_dict, natural_key

CACHE = Path.home() / ".cache" / "nanoseek" / "bench_real_scale"


# ----------------------------------------------------------------------------- the random checkpoint

def write_random_checkpoint(cfg: ModelConfig, path: Path, shard_bytes: int = 2 << 30) -> None:
    """Random bf16 weights for `cfg` as safetensors shards + index, tensor by tensor (never the whole
    model in memory), and a small tokenizer; written beside and renamed into place when complete."""
    from safetensors.torch import save_file

    from nanoseek.tokenizer import Tokenizer
    if (path / "model.safetensors.index.json").exists():
        return
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in hf_state_dict(Transformer(cfg)).items()}
    keys = sorted(shapes, key=natural_key)
    gen = torch.Generator().manual_seed(0)
    shard, size, weight_map, total, n = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0
    for i, key in enumerate(keys):
        shape = shapes[key]
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif key.endswith("e_score_correction_bias"):
            t = torch.zeros(shape, dtype=torch.float32)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=gen).to(torch.bfloat16)
        shard[key] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
            print(f"  wrote {total / 2**30:.1f} GiB ({i + 1}/{len(keys)} tensors)", flush=True)
    if shard:
        flush()
    write_index(tmp, weight_map, total)
    (tmp / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "bfloat16"}, indent=2))
    words = "the model reads every token once and writes its latent into the cache".split()
    Tokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 50, vocab_size=1000
                    ).save_pretrained(tmp)
    tmp.rename(path)


# ----------------------------------------------------------------------------- steps, each in a child process

def child(step: str, args: argparse.Namespace, **kw) -> dict:
    """Run `step` in a fresh Python process; returns its JSON result plus its peak RSS."""
    cmd = [sys.executable, __file__, "--child", step, "--child-args", json.dumps({**vars(args), **kw})]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_load_and_decode(a: dict) -> dict:
    from nanoseek.hf import load_pretrained
    from nanoseek.inference import Engine
    torch.set_num_threads(a["threads"])
    t0 = time.perf_counter()
    model = load_pretrained(a["path"], quantize=a["format"] if a["format"] != "bf16" else None, group_size=64)
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine, out = Engine(model), {"load_s": load_s, "peak_rss_load": rss_loaded}
    gen = torch.Generator().manual_seed(0)
    for ctx in a["contexts"]:
        prompt = torch.randint(3, model.config.vocab_size, (ctx,), generator=gen).tolist()
        stamps = []
        for _ in engine.stream([prompt], a["new_tokens"] + 1):
            stamps.append(time.perf_counter())
        steps = [y - x for x, y in zip(stamps, stamps[1:])]
        out[f"ms_per_token_{ctx}"] = statistics.median(steps) * 1e3
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(CACHE), help="folder for the random checkpoint (written once)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than V2-Lite's 27 (a quick check)")
    ap.add_argument("--formats", nargs="+", default=["int4", "int8"], help="quantize-on-load formats to measure")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 4096], help="prompt lengths for decode")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per context")
    ap.add_argument("--threads", type=int, default=2, help="threads for every library")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="nanoseek alone")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps({"step_load_and_decode": step_load_and_decode}[args.child](json.loads(args.child_args))))
        return 0
    cfg = ModelConfig.preset("deepseek-v2-lite")
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    path = Path(args.cache) / f"v2-lite-{cfg.num_hidden_layers}layers"
    t0 = time.perf_counter()
    write_random_checkpoint(cfg, path)
    print(f"checkpoint {path}: {sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.1f} GiB "
          f"({time.perf_counter() - t0:.0f} s), {args.threads} threads")
    for fmt in args.formats:
        r = child("step_load_and_decode", args, path=str(path), format=fmt)
        ctx = ", ".join(f"{c}: {r[f'ms_per_token_{c}']:.1f} ms/token" for c in args.contexts)
        print(f"nanoseek {fmt}: load {r['load_s']:.0f} s, peak RSS {r['peak_rss_load'] / 2**30:.1f} GiB; decode {ctx}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
