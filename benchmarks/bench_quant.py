"""Weight-only quantization side by side: fp32, bf16, int8, int4 decode speed, memory and held-out loss.

    .venv/bin/python benchmarks/bench_quant.py                              # 2 threads, trains its tiny model
    .venv/bin/python benchmarks/bench_quant.py --trained runs/demo/pretrain  # loss on an existing checkpoint
    .venv/bin/python benchmarks/bench_quant.py --skip-loss --rounds 8       # decode only

Decode: bench_decode.py's config (hidden 1024, 8 layers with the first dense, MLA with q_lora 384 /
kv_lora 256, 32 routed experts top-4 + 1 shared), random weights, batch 1, greedy, a 32-token prompt.
Each format is made from the same fp32 model in memory (bf16: a cast; int8/int4: ``quantize_model``,
the swap ``load_pretrained`` applies to an int8/int4 checkpoint). A round times every format once,
in turn, and ms/token is the median decode step over all rounds (prefill left out, as bench_decode).
"int8 bf16-act" is the int8 model with everything kept high-precision in bf16, so activations stay
bf16 between the kernels instead of being cast around each one.

Also the relative error of each format's logits on the prompt against fp32's (random weights make
greedy tokens a coin toss, so they are not compared). Memory: bytes of parameters + buffers (what the weights occupy), and the process RSS growth when the
format's model was built from the fp32 one (allocator-dependent; a rough check of the first).

Held-out loss: a tiny model pretrained in this script on the built-in arithmetic task (or --trained),
converted by ``convert_checkpoint`` (what ``nanoseek quantize`` runs) and loaded by ``load_pretrained``,
then scored by ``train.evaluate.evaluate_loss`` on the task's test split; relative to bf16.

On a machine whose cores other processes also use, run it with OMP_WAIT_POLICY=PASSIVE (OpenMP's
spinning threads otherwise make every op wait for a descheduled peer, ~100x slower steps); on an
idle machine leave it unset, as the other benchmarks do: passive threads wake late for every
parallel region, which costs the fp32 decode's split products (model.linear) most.
"""

from __future__ import annotations

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import CONFIG, VOCAB, nanoseek_steps  # noqa: E402

from nanoseek import ModelConfig, Transformer, load_pretrained  # noqa: E402
from nanoseek.inference import Engine  # noqa: E402
from nanoseek.quant import quantize_model  # noqa: E402
from nanoseek.quant.convert import convert_checkpoint  # noqa: E402


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def decode_formats(group_size: int) -> dict:
    """name -> function making that format's model from the fp32 one."""
    return {
        "fp32": lambda m: m,
        "bf16": lambda m: copy.deepcopy(m).to(torch.bfloat16),
        "int8": lambda m: quantize_model(copy.deepcopy(m), "int8"),
        "int8 bf16-act": lambda m: quantize_model(copy.deepcopy(m).to(torch.bfloat16), "int8"),
        "int4": lambda m: quantize_model(copy.deepcopy(m), "int4", group_size=group_size),
    }


def bench_decode(args) -> list[dict]:
    torch.manual_seed(0)
    before = rss()
    base = Transformer(ModelConfig(**CONFIG)).eval()
    rss_fp32 = rss() - before
    models, rows = {}, []
    for name, make in decode_formats(args.group_size).items():
        gc.collect()
        before = rss()
        t = time.perf_counter()
        models[name] = make(base)
        gc.collect()
        rows.append({"format": name, "weight_bytes": weight_bytes(models[name]),
                     "rss_delta": rss_fp32 if name == "fp32" else rss() - before,
                     "convert_s": time.perf_counter() - t, "steps": []})
    print(f"decode model: {base.num_params() / 1e6:.0f}M params ({base.num_params(active=True) / 1e6:.0f}M active); "
          "formats built")
    prompt = [torch.randint(1, VOCAB, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()]
    engines = {name: Engine(m) for name, m in models.items()}
    with torch.inference_mode():
        # random weights give near-flat logits, so greedy tokens say little: compare the prompt's logits
        ids = torch.tensor(prompt)
        logits = {name: m(ids).float() for name, m in models.items()}
        for name, engine in engines.items():  # warm-up: first calls allocate and pick kernels
            nanoseek_steps(engine, prompt, 4)
        for r in range(args.rounds):
            for row in rows:
                steps, _ = nanoseek_steps(engines[row["format"]], prompt, args.new_tokens)
                row["steps"] += steps
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{row['format']} {statistics.median(row['steps']) * 1e3:.1f}" for row in rows) + " ms/token")
    fp32_ms = statistics.median(rows[0]["steps"])
    for row in rows:
        row["ms"] = statistics.median(row["steps"])
        row["speedup"] = fp32_ms / row["ms"]
        ref = logits["fp32"]
        row["logit_error"] = float((logits[row["format"]] - ref).norm() / ref.norm())
    return rows


def train_tiny(out: Path, steps: int) -> Path:
    from nanoseek.train.loop import TrainConfig
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(out=str(out), data="arithmetic", preset="tiny", seq_len=256, num_examples=4000,
                         train=TrainConfig(steps=steps, batch_size=16, micro_batch_size=8, warmup_steps=20,
                                           progress=False))
    return pretrain(cfg)


def bench_loss(args, work: Path) -> list[dict]:
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.data.prompts import checkpoint_layout
    from nanoseek.train.evaluate import evaluate_loss

    path = Path(args.trained) if args.trained else None
    if path is None:
        t = time.perf_counter()
        path = train_tiny(work / "pretrain", args.train_steps)
        print(f"trained a tiny model for {args.train_steps} steps in {time.perf_counter() - t:.0f} s: {path}")
    tok = Tokenizer.from_pretrained(path)
    layout = checkpoint_layout(path)
    for fmt in ("int8", "int4"):
        convert_checkpoint(path, work / fmt, fmt, group_size=args.group_size, progress=False)
    models = {"fp32": lambda: load_pretrained(path, dtype=torch.float32),
              "bf16": lambda: load_pretrained(path, dtype=torch.bfloat16),
              "int8": lambda: load_pretrained(work / "int8", dtype=torch.float32),
              "int8 bf16-act": lambda: load_pretrained(work / "int8", dtype=torch.bfloat16),
              "int4": lambda: load_pretrained(work / "int4", dtype=torch.float32)}
    rows = []
    for name, load in models.items():
        r = evaluate_loss(load(), tok, "arithmetic", n=args.eval_examples, layout=layout)
        rows.append({"format": name, "loss": r["loss"], "tokens": r["tokens"]})
    bf16 = rows[1]["loss"]
    for row in rows:
        row["vs_bf16"] = (row["loss"] - bf16) / bf16
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--rounds", type=int, default=5, help="decode rounds; each times every format once")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per format and round")
    p.add_argument("--context", type=int, default=32, help="prompt length for the decode runs")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--trained", default=None, help="a trained checkpoint for the held-out loss (default: train one)")
    p.add_argument("--train-steps", type=int, default=200, help="steps of the tiny model trained for the loss")
    p.add_argument("--eval-examples", type=int, default=200, help="test-split problems scored for the loss")
    p.add_argument("--skip-loss", action="store_true", help="decode speed and memory only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    decode = bench_decode(args)
    print(f"\nDecode, batch 1, context {args.context}, {args.new_tokens} tokens x {args.rounds} rounds "
          f"(median step):\n")
    print("| format | ms/token | tokens/s | vs fp32 | weight memory | RSS growth | prompt logits vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in decode:
        print(f"| {r['format']} | {r['ms'] * 1e3:.1f} | {1 / r['ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['weight_bytes'] / 2**20:,.0f} MiB | {r['rss_delta'] / 2**20:,.0f} MiB | {r['logit_error']:.2%} |")
    if not args.skip_loss:
        with tempfile.TemporaryDirectory() as d:
            loss = bench_loss(args, Path(d))
        print(f"\nHeld-out loss (arithmetic test split, {loss[0]['tokens']:,} tokens):\n")
        print("| format | loss | vs bf16 |")
        print("|---|---:|---:|")
        for r in loss:
            print(f"| {r['format']} | {r['loss']:.4f} | {r['vs_bf16']:+.2%} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
