"""`nanoseek smoke`: a short real end-to-end check — build a tiny model, save it, load it back,
and generate a few tokens greedily from the loaded copy. What `make demo` runs until the full
demo pipeline lands.

    nanoseek smoke --out /tmp/nanoseek-smoke
"""

from __future__ import annotations

import tempfile
import time

import torch

from .hf import load_pretrained, save_pretrained
from .config import ModelConfig
from .model import Transformer


def greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Uncached greedy decoding: the reference the engine is tested against."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def run(args) -> int:
    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    out = args.out or tempfile.mkdtemp(prefix="nanoseek-smoke-")
    t0 = time.perf_counter()
    save_pretrained(model, out)
    loaded = load_pretrained(out)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    prompt = [cfg.bos_token_id, 5, 17, 42]
    tokens = greedy(loaded, prompt, args.tokens)
    print(f"tiny DeepSeek-V3-style model: {model.num_params():,} parameters "
          f"({model.num_params(active=True):,} active), saved to {out}")
    print(f"save -> load bit-exact: {same}")
    print(f"greedy tokens from the loaded copy: {tokens[len(prompt):]}  ({time.perf_counter() - t0:.2f}s)")
    return 0 if same else 1


def add_parser(sub) -> None:
    p = sub.add_parser("smoke", help="build, save, load and sample a tiny model (a quick end-to-end check)")
    p.add_argument("--out", default=None, help="checkpoint folder to write (default: a temp folder)")
    p.add_argument("--tokens", type=int, default=8, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    p.set_defaults(func=run)
