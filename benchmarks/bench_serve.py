"""Serving throughput and prefix-cache latency through the real HTTP server.

    python benchmarks/bench_serve.py                       # random-weight model built here, ~2 minutes
    python benchmarks/bench_serve.py --model runs/sft --out runs/bench_serve.md

Starts `nanoseek serve` on loopback in its own process (OMP_NUM_THREADS=--threads), then drives it
with streaming /v1/completions clients (asyncio + httpx, in this process) over HTTP:

1. Continuous batching: 1, 8 and 32 concurrent clients, each sending requests one after another
   (different prompts, max_tokens fixed). Requests use the `ignore_eos` extension field (as in
   vLLM) so every request makes exactly max_tokens tokens whatever the weights. Reported: requests/s
   and total generated tokens/s; the target is >= 3x the tokens/s of one client with 8 clients.
2. Prefix cache: a fresh ~1,000-token prompt sent twice; the second time its latents come from the
   prefix cache. Reported: time to first token and total latency, cold vs cached (median of
   --repeats different prompts); the target is >= 3x faster the second time.
3. Structured output: one client, tokens/s of completions constrained by a JSON schema (an array of
   --json-items digits) against plain ones of the same length; the target is <= 1.3x slower.
4. Tool-call round trip: a chat request with tool_choice "required", the tool's result sent back,
   and the answer (16 tokens): wall time of the two requests, median of --repeats.

Clients and server share the machine's cores, so the figures are conservative. Without --model the model is a random-weight DeepSeek-V3-style
config (below) with a tokenizer trained here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from nanoseek.hf import save_pretrained
from nanoseek.config import ModelConfig
from nanoseek.inference import Engine
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

WORDS = ("the model reads every token once and writes its latent into the cache so that later "
         "queries attend in latent space experts route tokens by affinity and balance their load").split()


def build_model(path: Path) -> None:
    """A random-weight small DeepSeek-V3-style model (4 layers, width 256, 8 routed experts)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                                             q_lora_rank=128, kv_lora_rank=64, max_position_embeddings=2048)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    save_pretrained(model, path)
    Tokenizer.train([" ".join(random.Random(i).choices(WORDS, k=40)) for i in range(200)],
                    vocab_size=512).save_pretrained(path)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


async def stream_once(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion -> {ttft, total, tokens, cached}."""
    t0 = time.perf_counter()
    ttft, usage = None, None
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            elif ttft is None and event["choices"]:  # the first text (or the end, if all of it
                ttft = time.perf_counter() - t0       # was a half UTF-8 character held back)
    return dict(ttft=ttft, total=time.perf_counter() - t0, tokens=usage["completion_tokens"],
                cached=usage["prompt_tokens_details"]["cached_tokens"], prompt_tokens=usage["prompt_tokens"])


async def throughput(base: str, model: str, clients: int, per_client: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[text(rng, 12) for _ in range(per_client)] for _ in range(clients)]
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        async def worker(mine):
            return [await stream_once(client, model, p, max_tokens) for p in mine]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(m) for m in prompts)) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return dict(clients=clients, requests=len(results), tokens=tokens, wall=wall,
                rps=len(results) / wall, tps=tokens / wall)


async def prefix_cache(base: str, model: str, words: int, repeats: int, max_tokens: int) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        for i in range(repeats):
            prompt = text(random.Random(1000 + i), words)  # new each time: the first send is cold
            cold = await stream_once(client, model, prompt, max_tokens)
            warm = await stream_once(client, model, prompt, max_tokens)
            rows.append(dict(cold=cold, warm=warm))
    return rows


def structured(base: str, model: str, items: int, repeats: int) -> dict:
    """tokens/s with a JSON schema, and without it for requests of the same lengths (one client,
    non-streaming, greedy); a warm-up request of each kind first."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": items, "maxItems": items}
    fmt = {"type": "json_schema", "json_schema": {"name": "digits", "schema": schema}}
    out, lengths = {}, []
    with httpx.Client(timeout=300) as client:
        def run(body):
            t0 = time.perf_counter()
            r = client.post(base + "/v1/completions", json=body)
            r.raise_for_status()
            return r.json(), time.perf_counter() - t0
        run({"model": model, "prompt": "warm", "max_tokens": 4 * items + 8, "response_format": fmt})
        tokens = wall = 0
        for i in range(repeats):
            got, s = run({"model": model, "prompt": f"list {i}:", "temperature": 0, "max_tokens": 4 * items + 8,
                          "response_format": fmt})
            assert len(json.loads(got["choices"][0]["text"])) == items
            lengths.append(got["usage"]["completion_tokens"])
            tokens, wall = tokens + lengths[-1], wall + s
        out["schema"] = dict(tokens=tokens, wall=wall, tps=tokens / wall)
        tokens = wall = 0
        for i, n in enumerate(lengths):
            got, s = run({"model": model, "prompt": f"list {i}:", "temperature": 0, "max_tokens": n, "ignore_eos": True})
            tokens, wall = tokens + got["usage"]["completion_tokens"], wall + s
        out["plain"] = dict(tokens=tokens, wall=wall, tps=tokens / wall)
    return out


def tool_round_trip(base: str, model: str, repeats: int) -> list[float]:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}}, "required": ["city"],
        "additionalProperties": False}}}
    times = []
    with httpx.Client(timeout=300) as client:
        for i in range(repeats + 1):
            msgs = [{"role": "user", "content": f"weather {i}?"}]
            t0 = time.perf_counter()
            call = client.post(base + "/v1/chat/completions", json={
                "model": model, "messages": msgs, "tools": [tool], "tool_choice": "required", "max_tokens": 256,
                "temperature": 0, "max_thinking_tokens": 0}).json()["choices"][0]["message"]
            msgs += [call, {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "sunny"}]
            client.post(base + "/v1/chat/completions", json={"model": model, "messages": msgs, "tools": [tool],
                                                              "max_tokens": 16, "temperature": 0,
                                                              "ignore_eos": True}).raise_for_status()
            if i:  # the first is a warm-up (grammar engine, tokenizer view)
                times.append(time.perf_counter() - t0)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120, log=None, poll_s: float = 0.2) -> None:
    """Until /health answers 200; the server's output (its stderr pipe, or the file `log` it writes
    to) is in the error when it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            if log is not None:
                log.seek(0)
            raise RuntimeError(f"nanoseek serve exited:\n{(log or server.stderr).read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"nanoseek serve did not come up within {timeout:.0f}s")


def machine(threads: int) -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except OSError:
        name = platform.processor()
    return f"{name}, {os.cpu_count()} cores visible, torch {torch.__version__}, server with {threads} torch thread(s)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random-weight model built here)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the model (1: on a shared 2-core machine 2 threads stall each other)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request in the throughput runs")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts to measure")
    ap.add_argument("--requests", type=int, default=64,
                    help="requests per run, split among the clients (one client sends an eighth of them)")
    ap.add_argument("--prefix-words", type=int, default=1000, help="words in the prefix-cache prompt (~1 token each)")
    ap.add_argument("--repeats", type=int, default=5, help="prompts sent twice in the prefix-cache test")
    ap.add_argument("--json-items", type=int, default=24, help="digits in the structured-output array")
    ap.add_argument("--out", default=None, help="also write the results table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = None
    path = args.model
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        path = tmp.name
        build_model(Path(path))
    engine = Engine.from_pretrained(path)  # only for the parameter count and dtype; the server loads its own copy
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The server is the real command in its own process, as clients would meet it.
    server = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", path, "--port", str(port),
                               "--served-model-name", "bench", "--max-batch", "32", "--queue-size", "128"],
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    print(f"model: {args.model or 'random-weight (built here)'}, {engine.model.num_params():,} parameters; "
          f"serving on {base}")
    try:
        wait_until_up(base, server)
        asyncio.run(throughput(base, "bench", 2, 1, 8, seed=99))  # warm-up
        runs = []
        for c in (int(x) for x in args.concurrency.split(",")):
            per = max(1, args.requests // c) if c > 1 else max(1, args.requests // 8)
            r = asyncio.run(throughput(base, "bench", c, per, args.max_tokens, seed=c))
            runs.append(r)
            print(f"{c:>3} clients: {r['requests']} requests, {r['tokens']} tokens in {r['wall']:.1f}s: "
                  f"{r['rps']:.2f} requests/s, {r['tps']:.1f} tokens/s "
                  f"({r['tps'] / runs[0]['tps']:.2f}x one client)")
        pc = asyncio.run(prefix_cache(base, "bench", args.prefix_words, args.repeats, 8))
        so = structured(base, "bench", args.json_items, args.repeats)
        rt = tool_round_trip(base, "bench", args.repeats)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if tmp is not None:
            tmp.cleanup()

    med = {k: {m: statistics.median(r[k][m] for r in pc) for m in ("ttft", "total")} for k in ("cold", "warm")}
    prompt_tokens, cached = pc[0]["warm"]["prompt_tokens"], pc[0]["warm"]["cached"]
    ttft_x, total_x = med["cold"]["ttft"] / med["warm"]["ttft"], med["cold"]["total"] / med["warm"]["total"]
    print(f"prefix cache, {prompt_tokens}-token prompt ({cached} cached the second time), 8 new tokens: "
          f"time to first token {med['cold']['ttft'] * 1e3:.0f} -> {med['warm']['ttft'] * 1e3:.0f} ms "
          f"({ttft_x:.1f}x), total {med['cold']['total'] * 1e3:.0f} -> {med['warm']['total'] * 1e3:.0f} ms "
          f"({total_x:.1f}x)")

    slow = so["plain"]["tps"] / so["schema"]["tps"]
    print(f"structured output: {so['schema']['tps']:.1f} tokens/s with a JSON schema, {so['plain']['tps']:.1f} "
          f"without ({slow:.2f}x slower); tool-call round trip {statistics.median(rt) * 1e3:.0f} ms")

    command = "python " + " ".join([sys.argv[0].replace(str(Path.cwd()) + "/", "")] + sys.argv[1:])
    lines = [
        "# Serving benchmark (`nanoseek serve`)", "",
        f"Command: `{command}`  ", f"Machine: {machine(args.threads)}  ",
        f"Model: {args.model or 'random-weight DeepSeek-V3-style (4 layers, width 256, 8 routed experts), built by the script'}"
        f", {engine.model.num_params():,} parameters, {engine.dtype}.  ",
        "Clients: streaming `/v1/completions` over HTTP on loopback from a separate process; greedy, "
        f"`ignore_eos` so each request makes exactly {args.max_tokens} tokens.", "",
        "## Continuous batching", "",
        "| concurrent clients | requests | tokens | wall (s) | requests/s | tokens/s | vs 1 client |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['rps']:.2f} | "
          f"{r['tps']:.1f} | {r['tps'] / runs[0]['tps']:.2f}x |" for r in runs), "",
        "## Prefix cache", "",
        f"A fresh {prompt_tokens}-token prompt sent twice ({cached} tokens served from the prefix cache the "
        f"second time), 8 new tokens, median of {args.repeats} prompts.", "",
        "| | time to first token (ms) | total (ms) |", "|---|---:|---:|",
        f"| first send (cold) | {med['cold']['ttft'] * 1e3:.0f} | {med['cold']['total'] * 1e3:.0f} |",
        f"| second send (cached) | {med['warm']['ttft'] * 1e3:.0f} | {med['warm']['total'] * 1e3:.0f} |",
        f"| speedup | {ttft_x:.1f}x | {total_x:.1f}x |", "",
        "## Structured output and tool calls", "",
        f"One client, non-streaming `/v1/completions`, {args.repeats} requests each: an array of "
        f"{args.json_items} digits constrained by a JSON schema (llguidance), and plain greedy requests.", "",
        "| | tokens | wall (s) | tokens/s |", "|---|---:|---:|---:|",
        *(f"| {k} | {v['tokens']} | {v['wall']:.2f} | {v['tps']:.1f} |" for k, v in so.items()),
        f"| schema vs plain | | | {slow:.2f}x slower |", "",
        f"Tool-call round trip (tool_choice required -> tool result -> 16-token answer), median of "
        f"{args.repeats}: {statistics.median(rt) * 1e3:.0f} ms.", "",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
