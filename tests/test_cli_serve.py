"""`nanoseek serve` as a user starts it: a model whose config says 1M tokens of context starts in the
weights plus its --kv-cache-memory (the cache is paged, not preallocated per slot) and answers."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import randomize_

from nanoseek.config import ModelConfig
from nanoseek.hf import save_pretrained
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

TEXTS = ["12+30=42", "7*6=42", "the answer is 42", "think first, then answer"] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_a_million_token_context_starts_within_the_kv_budget(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(max_position_embeddings=1_000_000)
    save_pretrained(randomize_(Transformer(cfg), scale=0.1), tmp_path)
    Tokenizer.train(TEXTS, vocab_size=300).save_pretrained(tmp_path)
    slots = 16 * cfg.max_position_embeddings * cfg.cache_bytes_per_token(4)  # what per-slot preallocation took
    assert slots > 8 << 30
    port, budget = free_port(), 64 << 20
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(tmp_path), "--port", str(port),
                             "--kv-cache-memory", "64MB", "--max-batch", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError(proc.stdout.read() if proc.poll() is not None else "the server did not start")
        rss = rss_bytes(proc.pid)
        weights = sum(p.numel() * 4 for p in Transformer(cfg).parameters())
        assert rss < weights + budget + (1 << 30), rss  # the bound: weights + budget + 1 GB
        r = httpx.post(base + "/v1/completions", json={"model": tmp_path.name, "prompt": "12+30=", "max_tokens": 8,
                                                        "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
