"""Batch-1 decode of a dense family model (default: R1-Distill-Qwen-1.5B's shape, random weights) in
bf16, int8 and int4: nanoseek's Engine against transformers `generate` and, when built, llama.cpp.

    .venv/bin/python benchmarks/bench_dense_decode.py                          # the whole 1.5B shape
    .venv/bin/python benchmarks/bench_dense_decode.py --layers 4 --new-tokens 8  # a quick look
    .venv/bin/python benchmarks/bench_dense_decode.py --preset r1-distill-llama-8b --precisions int4
    .venv/bin/python benchmarks/bench_dense_decode.py --llama-cpp --no-transformers --threads 2

The model is built once in bf16 and saved; each precision loads that checkpoint (int8/int4:
``load_pretrained(quantize=...)``, every linear layer quantized, embeddings kept). Timing is
bench_decode.py's: a timestamp after every forward, the prefill left out, the median step.
transformers has no CPU int8/int4 path in this environment (no torchao, quanto or bitsandbytes),
so its row is bf16 only and nanoseek's int8/int4 rows are compared with it.

With --llama-cpp, llama.cpp (the llama-cpp-python build in this environment) decodes the same
checkpoint converted by its own converter to bf16 and quantized to Q8_0 / Q4_0 (llama_cpp_side.py),
same prompt, same threads, greedy; its bf16 tokens are compared with nanoseek's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from bench_decode import nanoseek_steps, transformers_steps

from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.estimate import estimate
from nanoseek.inference import Engine
from nanoseek.tokenizer import Tokenizer

GGUF_TYPE = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp's nearest formats


def build_checkpoint(cfg: ModelConfig, folder: Path) -> None:
    """A random model of `cfg` built straight in bf16 (no fp32 copy of 1.5B+ weights), saved."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    save_pretrained(model, folder, max_shard_size="2GB")


def time_nanoseek(folder: Path, precision: str, prompt: list[int], new_tokens: int, repeats: int):
    model = load_pretrained(folder, dtype=torch.bfloat16, quantize=None if precision == "bf16" else precision)
    engine = Engine(model)
    steps, out = [], None
    for _ in range(repeats):
        s, out = nanoseek_steps(engine, [prompt], new_tokens)
        steps += s
    return statistics.median(steps), out[0], engine.cache_bytes_per_token()


def time_transformers(folder: Path, prompt: list[int], new_tokens: int, repeats: int):
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    steps, out = [], None
    for _ in range(repeats):
        s, out, _cache = transformers_steps(model, torch.tensor([prompt]), new_tokens)
        steps += s
    return statistics.median(steps), out[0]


def time_llama_cpp(folder: Path, workdir: Path, precision: str, prompt: list[int], new_tokens: int, repeats: int,
                   threads: int) -> tuple[float, list[int]]:
    """Median seconds per decoded token and the greedy tokens of llama.cpp on a GGUF converted from the
    same checkpoint (llama_cpp_side: llama.cpp's converter and quantizer)."""
    from llama_cpp_side import decode_steps, to_gguf
    gguf = to_gguf(folder, workdir, GGUF_TYPE[precision], threads)
    steps, out = [], None
    for _ in range(repeats):
        s, out = decode_steps(gguf, prompt, new_tokens + 1, threads)
        steps += s[:-1]
    return statistics.median(steps), out[:new_tokens]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="r1-distill-qwen-1.5b", help="a dense family preset (ModelConfig.preset)")
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (a quick run)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "int8", "int4"], choices=list(GGUF_TYPE))
    p.add_argument("--context", type=int, default=32, help="prompt tokens before the timed decode")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per library and precision")
    p.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads (default: torch's)")
    p.add_argument("--no-transformers", action="store_true", help="time nanoseek (and llama.cpp) only")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also llama.cpp (the llama-cpp-python build) on the same weights: bf16, Q8_0, Q4_0")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    prompt = torch.randint(1, cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_checkpoint(cfg, folder)
        words = "the model reads every token once and writes its latent into the cache".split()
        Tokenizer.train([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 50, vocab_size=1000
                        ).save_pretrained(folder)  # llama.cpp's converter wants one; the ids are random anyway
        params = estimate(cfg).total_params
        print(f"{args.preset}{f' cut to {args.layers} layers' if args.layers else ''}: {params / 1e9:.2f}B params, "
              f"batch 1, context {args.context}, {args.new_tokens} new tokens x {args.repeats}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        ref = None
        if not args.no_transformers:
            ref = time_transformers(folder, prompt, args.new_tokens, args.repeats)
            print(f"transformers bf16: {ref[0] * 1e3:.1f} ms/token")
        print(f"{'precision':>9}{'nanoseek ms/token':>19}{'vs transformers bf16':>22}{'llama.cpp ms/token':>20}"
              f"{'cache B/token':>15}{'same tokens':>13}")
        for precision in args.precisions:
            t, out, cache = time_nanoseek(folder, precision, prompt, args.new_tokens, args.repeats)
            ratio = f"{ref[0] / t:.2f}x" if ref else "-"
            same = str(out == ref[1]) if ref and precision == "bf16" else "-"
            lcpp = "not run"
            if args.llama_cpp:
                t_cpp, out_cpp = time_llama_cpp(folder, Path(tmp) / "gguf", precision, prompt, args.new_tokens,
                                                args.repeats, torch.get_num_threads())
                lcpp = f"{t_cpp * 1e3:.1f} ({t / t_cpp:.2f}x)"
                same = same if precision != "bf16" else f"{same}, llama.cpp {out_cpp == out}"
            print(f"{precision:>9}{t * 1e3:>19.1f}{ratio:>22}{lcpp:>20}{cache:>15,}{same:>13}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
