"""A short real end-to-end check: build a tiny model, save it, load it back, and generate a few
tokens greedily from the loaded copy (command: cli/smoke.py).

    res = smoke(out="/tmp/nanoseek-smoke", tokens=8, seed=0)
    res.same, res.tokens          # save -> load bit-exact?, the greedy continuation
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from .hf import load_pretrained, save_pretrained
from .config import ModelConfig
from .model import Transformer
from .models import build_model


def greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Uncached greedy decoding: the reference the engine is tested against."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@dataclass
class SmokeResult:
    params: int
    active_params: int
    out: str  # the checkpoint folder written
    same: bool  # save -> load is bit-exact
    tokens: list[int]  # greedy tokens from the loaded copy
    seconds: float


def smoke(out: str | None = None, tokens: int = 8, seed: int = 0) -> SmokeResult:
    """Build the tiny preset (seeded), save it to `out` (a temp folder if None), load it back, decode greedily."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg).eval()
    out = out or tempfile.mkdtemp(prefix="nanoseek-smoke-")
    t0 = time.perf_counter()
    save_pretrained(model, out)
    loaded = load_pretrained(out)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    prompt = [cfg.bos_token_id, 5, 17, 42]
    new = greedy(loaded, prompt, tokens)[len(prompt):]
    return SmokeResult(model.num_params(), model.num_params(active=True), out, same, new, time.perf_counter() - t0)
