"""nanoseek's int8 / int4 CPU kernels (quant/cpu_kernels.py) against torch's weight-only kernels.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/bench_cpu_kernels.py            # 1 and 2 threads
    .venv/bin/python benchmarks/bench_cpu_kernels.py --threads 2 --rows 1 4 --group 128

For each of DeepSeek-V2-Lite's decode matrices (hidden 2048; attention projections, the two shared
experts, one routed expert, the 102400-row head) and each number of rows of x (decode: 1; small
batches), the median time of one product over enough copies of the weight that they do not fit
in the CPU's caches (>= 256 MB in all, cycled), as GB/s of weight bytes read (codes + scales,
the same count for both kernels), and as a fraction of the machine's read bandwidth measured in
the same run at the same thread count (the median time of a 1 GiB fp32 tensor's sum).

Then the routed experts as the model calls them: ``Int8Experts`` / ``Int4Experts`` with V2-Lite's
64 experts of [1408, 2048], 6 chosen per token, one token (``QuantExperts.forward``: two products
per chosen expert), built with and without the extension (NANOSEEK_NO_EXT=1 at build and call).

The kernels' own rounding is checked too: relative error of each product against the exact fp32
product with the dequantized weight (the extension quantizes activations to int8 in blocks; torch
casts them to bf16).

The machine this was written on is shared: the script prints `uptime`'s load before and after;
a load above the core count means the figures are low.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nanoseek.quant import cpu_kernels
from nanoseek.quant.formats import int4_quantize, int8_quantize
from nanoseek.quant.modules import Int4Experts, Int8Experts, int4_centred, int4_kernel_layout, int4_unpack

# (name, N outputs, K inputs) of DeepSeek-V2-Lite (hidden 2048, 16 heads, no q_lora, kv_lora 512)
SHAPES = [
    ("q_proj", 3072, 2048),
    ("kv_a_proj", 576, 2048),
    ("o_proj", 2048, 2048),
    ("shared gate/up", 2816, 2048),
    ("shared down", 2048, 2816),
    ("expert gate_up", 2816, 2048),
    ("expert down", 2048, 1408),
    ("head", 102400, 2048),
]
CACHE_BYTES = 256 << 20  # cycle over this much weight per measurement


def timed(calls, rounds: int) -> float:
    """Median seconds per call over `rounds` passes through `calls` (after one warm-up pass)."""
    for f in calls:
        f()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for f in calls:
            f()
        times.append((time.perf_counter() - t0) / len(calls))
    return statistics.median(times)


def read_bandwidth(rounds: int) -> float:
    big = torch.ones(1 << 28)  # 1 GiB
    return big.numel() * 4 / timed([big.sum], rounds) / 1e9


def load() -> str:
    return open("/proc/loadavg").read().split(" ")[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


def bench_shapes(args, bw: float) -> None:
    g = args.group
    print(f"| matrix | N x K | rows | format | torch GB/s | nanoseek GB/s | nanoseek / read bw | "
          f"rel. error torch / nanoseek |")
    print("|---|---|---|---|---|---|---|---|")
    for name, N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        q8, s8 = int8_quantize(w)
        s8 = s8.bfloat16()
        packed, scale, wmin = int4_quantize(w, g)
        scale_b, zero = int4_centred(scale, wmin)
        w8 = q8.float() * s8.float()[:, None]
        q = int4_unpack(packed).float() - 8
        w4 = (q.view(N, K // g, g) * scale_b.float()[..., None] + zero.float()[..., None]).view(N, K)
        tq, tsz = int4_kernel_layout(packed, scale_b.float(), zero.float() - 8 * scale_b.float())
        b8, b4 = N * K + 2 * N, N * K // 2 + 4 * N * (K // g)
        copies = max(1, CACHE_BYTES // b4)
        c8 = [(q8.clone(), s8.clone()) for _ in range(copies)]
        c4 = [(packed.clone(), scale_b.clone(), zero.clone(), tq.clone(), tsz.clone()) for _ in range(copies)]
        for M in args.rows:
            x = torch.randn(M, K)
            xb = x.bfloat16()
            ref8, ref4 = x @ w8.T, x @ w4.T
            e = (rel(torch._weight_int8pack_mm(xb, q8, s8), ref8), rel(cpu_kernels.int8_mm(x, q8, s8), ref8))
            t_torch = timed([lambda c=c: torch._weight_int8pack_mm(xb, *c) for c in c8], args.rounds)
            t_ours = timed([lambda c=c: cpu_kernels.int8_mm(x, *c) for c in c8], args.rounds)
            print(f"| {name} | {N}x{K} | {M} | int8 | {b8 / t_torch / 1e9:.1f} | {b8 / t_ours / 1e9:.1f} | "
                  f"{b8 / t_ours / 1e9 / bw:.0%} | {e[0]:.4f} / {e[1]:.4f} |")
            e = (rel(torch._weight_int4pack_mm_for_cpu(xb, tq, g, tsz)[:, :N], ref4),
                 rel(cpu_kernels.int4_mm(x, packed, scale_b, zero), ref4))
            t_torch = timed([lambda c=c: torch._weight_int4pack_mm_for_cpu(xb, c[3], g, c[4]) for c in c4],
                            args.rounds)
            t_ours = timed([lambda c=c: cpu_kernels.int4_mm(x, *c[:3]) for c in c4], args.rounds)
            print(f"| {name} | {N}x{K} | {M} | int4 g{g} | {b4 / t_torch / 1e9:.1f} | {b4 / t_ours / 1e9:.1f} | "
                  f"{b4 / t_ours / 1e9 / bw:.0%} | {e[0]:.4f} / {e[1]:.4f} |")


def bench_experts(args, bw: float) -> None:
    E, D, I, K = 64, 2048, 1408, 6
    gen = torch.Generator().manual_seed(0)
    for fmt in ("int8", "int4"):
        out = {}
        for ext in (False, True):
            if ext:
                os.environ.pop(cpu_kernels.ENV_DISABLE, None)
            else:
                os.environ[cpu_kernels.ENV_DISABLE] = "1"
            torch.manual_seed(0)
            if fmt == "int8":
                m = Int8Experts(E, D, I)
                m.gate_up_proj.random_(-127, 128)
                m.down_proj.random_(-127, 128)
                m.gate_up_scale.fill_(1e-4)
                m.down_scale.fill_(1e-4)
            else:
                m = Int4Experts(E, D, I, group_size=args.group)
                parts = [int4_quantize(torch.randn(n, k) * 0.02, args.group) for n, k in ((I, D), (I, D), (D, I))]
                for e in range(E):  # the same values in every expert, at 64 addresses: all read from memory
                    m.set_expert(e, *parts)
            per_expert = sum(t[0].numel() * t.element_size() for t in m.buffers())
            x = torch.randn(1, D)
            calls = []
            for _ in range(64):
                idx = torch.randperm(E, generator=gen)[:K].view(1, K)
                w = torch.rand(1, K, generator=gen)
                calls.append(lambda idx=idx, w=w: m(x, w, idx))
            with torch.no_grad():
                t = timed(calls, args.rounds)
            out[ext] = t
            gbs = K * per_expert / t / 1e9
            print(f"| routed experts, 1 token | {fmt}{'' if fmt == 'int8' else f' g{args.group}'} | "
                  f"{'nanoseek' if ext else 'torch'} ({m.layout if fmt == 'int4' else 'int8'}) | "
                  f"{t * 1e3:.3f} ms | {gbs:.1f} GB/s | {gbs / bw:.0%} |")
            del m
    os.environ.pop(cpu_kernels.ENV_DISABLE, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--skip-experts", action="store_true")
    args = ap.parse_args()
    if cpu_kernels.kernels() is None:
        raise SystemExit("nanoseek's CPU kernels cannot run here (see the log line above)")
    print(f"load before: {load()} (cores: {os.cpu_count()})")
    for threads in args.threads:
        torch.set_num_threads(threads)
        bw = read_bandwidth(args.rounds)
        print(f"\n### {threads} thread(s): read bandwidth {bw:.1f} GB/s (1 GiB fp32 sum), load {load()}\n")
        if not args.skip_shapes:
            bench_shapes(args, bw)
        if not args.skip_experts:
            print("\n| what | format | kernel | time | weight GB/s | / read bw |\n|---|---|---|---|---|---|")
            bench_experts(args, bw)
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
