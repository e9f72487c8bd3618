"""Grammar engines for constrained decoding on this CPU: llguidance, xgrammar, outlines-core.

    python benchmarks/grammar_engines.py                 # the engines that are installed
    python benchmarks/grammar_engines.py --vocab 100000 --steps 60

Builds a byte-level vocabulary of --vocab tokens (256 bytes + random 2-8 character pieces), then
for each engine and each JSON schema: compile time, and the mean time to compute the next-token
mask over --steps steps of a random walk through valid outputs (a random allowed token each
step, seeded). The mask time is what every constrained row adds to every decode step; the
compile time is paid once per request (nanoseek compiles in the request's worker thread).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

SCHEMAS = {
    "nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "boolean"}},
                                                      "required": ["b"]}}, "required": ["a"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 40},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "bounds": {"type": "object", "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5},
                                                "k": {"type": "integer", "minimum": 10, "maximum": 20}},
               "required": ["x", "k"]},
    "strings": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                 "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["name", "tags"]},
    "anyOf+$ref": {"$defs": {"p": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
                   "anyOf": [{"$ref": "#/$defs/p"}, {"type": "array", "items": {"$ref": "#/$defs/p"}}]},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"]},
}


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies store)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocabulary(size: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    pieces = [bytes([b]) for b in range(256)]
    seen = set(pieces)
    chars = b'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 {}[]":,.-_'
    while len(pieces) < size - 1:
        p = bytes(rng.choice(chars) for _ in range(rng.randint(2, 8)))
        if p not in seen:
            seen.add(p)
            pieces.append(p)
    return pieces + [b"<eos>"]


def tokenizer_json(pieces: list[bytes]) -> str:
    m = byte_level_alphabet()
    vocab = {("<eos>" if p == b"<eos>" else "".join(m[b] for b in p)): i for i, p in enumerate(pieces)}
    return json.dumps({"version": "1.0", "truncation": None, "padding": None,
                       "added_tokens": [{"id": len(pieces) - 1, "content": "<eos>", "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True}],
                       "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                             "trim_offsets": True, "use_regex": True},
                       "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False,
                                                           "trim_offsets": True, "use_regex": True},
                       "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                                 "vocab": vocab, "merges": []}})


def walk(mask_fn, advance_fn, done_fn, steps: int, seed: int) -> list[float]:
    rng, times = random.Random(seed), []
    for _ in range(steps):
        if done_fn():
            break
        t0 = time.perf_counter()
        allowed = mask_fn()
        times.append(time.perf_counter() - t0)
        ids = allowed.nonzero().flatten().tolist()
        if not ids:
            break
        advance_fn(rng.choice(ids))
    return times


def bits(words: torch.Tensor, V: int) -> torch.Tensor:
    b = words.contiguous().view(torch.uint8)
    return ((b[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:V].bool()


def bench_llguidance(pieces, steps):
    import llguidance
    tok = llguidance.LLTokenizer(tokenizer_json(pieces), eos_token=len(pieces) - 1)
    V = len(pieces)

    def run(schema):
        t0 = time.perf_counter()
        g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides={"whitespace_flexible": False})
        m = llguidance.LLMatcher(tok, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        compile_s = time.perf_counter() - t0
        return compile_s, walk(lambda: bits(torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32), V),
                               m.consume_token, m.is_stopped, steps, 0)
    return run


def bench_xgrammar(pieces, steps):
    import xgrammar as xgr
    V = len(pieces)
    info = xgr.TokenizerInfo([p for p in pieces], vocab_type=xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[V - 1])
    compiler = xgr.GrammarCompiler(info, max_threads=1)

    def run(schema):
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        m = xgr.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - t0
        mask = xgr.allocate_token_bitmask(1, V)

        def allowed():
            m.fill_next_token_bitmask(mask)
            return bits(mask[0], V)
        return compile_s, walk(allowed, m.accept_token, m.is_terminated, steps, 0)
    return run


def bench_outlines(pieces, steps):
    import outlines_core as oc
    V = len(pieces)
    vocab = oc.Vocabulary(V - 1, {p: [i] for i, p in enumerate(pieces[:-1])})

    def run(schema):
        t0 = time.perf_counter()
        index = oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(schema)), vocab)
        guide = oc.Guide(index)
        compile_s = time.perf_counter() - t0

        def allowed():
            m = torch.zeros(V, dtype=torch.bool)
            m[[t for t in guide.get_tokens() if t < V]] = True
            return m
        return compile_s, walk(allowed, guide.advance, guide.is_finished, steps, 0)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=100_000, help="vocabulary size")
    ap.add_argument("--steps", type=int, default=60, help="mask computations per schema")
    ap.add_argument("--timeout", type=float, default=120, help="skip an engine's schema compile taking longer (s)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pieces = vocabulary(args.vocab)
    print(f"vocabulary: {len(pieces):,} tokens; {args.steps} mask steps per schema; 1 thread\n")
    print("| engine | schema | compile (ms) | mask per step (µs, mean) | steps |")
    print("|---|---|---:|---:|---:|")
    for name, make in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar), ("outlines-core", bench_outlines)):
        try:
            run = make(pieces, args.steps)
        except Exception as e:  # not installed, or its vocabulary setup failed
            print(f"| {name} | (unavailable: {type(e).__name__}: {str(e)[:80]}) | | | |")
            continue
        for sname, schema in SCHEMAS.items():
            try:
                compile_s, times = run(schema)
                print(f"| {name} | {sname} | {compile_s * 1e3:.1f} | {statistics.mean(times) * 1e6:.0f} | {len(times)} |",
                      flush=True)
            except Exception as e:
                print(f"| {name} | {sname} | unsupported: {type(e).__name__}: {str(e)[:60]} | | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
