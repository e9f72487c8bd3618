"""FLOPs and MFU: how much of the machine a training step uses.

    flops_per_token = training_flops_per_token(model, seq_len)
    peak = matmul_peak_flops("cpu", torch.bfloat16)          # best dense matmul FLOP/s seen here
    mfu(flops_per_token, tokens=8192, seconds=0.5, peak=peak)

MFU = achieved FLOP/s / the machine's best measured matmul peak (bf16 with autocast, else fp32;
kept across runs, see matmul_peak_flops), with training FLOPs per token =
6·N_active + 6·L·H·(d_qk + d_v)·T: N_active counts the weights one token multiplies (K of E
routed experts, lm_head once more per MTP depth, no embedding lookup); the second term is
attention's QKᵀ and AV over the full T×T square (PaLM's convention).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from pathlib import Path

import torch
from torch import nn

from ..hf.fsutil import atomic_write_text


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6·N_active + 6·L·H·(d_qk + d_v)·T: see the module docstring."""
    cfg = model.config
    n = model.num_params(active=True, include_mtp=True)
    if not cfg.tie_word_embeddings:
        n -= model.model.embed_tokens.weight.numel()  # a lookup, not a matmul
    n += cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # lm_head again per MTP depth
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attn = 6 * layers * cfg.num_attention_heads * sum(cfg.head_dims) * seq_len
    return 6.0 * n + attn


def mfu(flops_per_token: float, tokens: int, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: the FLOP/s achieved on `tokens` in `seconds`, over `peak` FLOP/s."""
    return flops_per_token * tokens / seconds / peak


def _measure_matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Dense square-matmul FLOP/s now: the best of several short trials."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(5):
        sync()
        iters, t0 = 0, time.perf_counter()
        while iters < 2 or time.perf_counter() - t0 < 0.08:
            a @ b
            iters += 1
        sync()
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


def _machine_key(device: str, dtype: torch.dtype) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        cpuinfo = Path("/proc/cpuinfo")
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
        name = f"{found.group(1).strip() if found else platform.processor()} x{torch.get_num_threads()} threads"
    return f"{name} {str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """This machine's dense matmul FLOP/s: the highest ever measured here.

    A measurement taken while other work shares the machine comes out low, and MFU against it
    high (over 100% on a busy 2-core box). So the best figure per device, thread count and dtype
    is kept in ``$XDG_CACHE_HOME/nanoseek/matmul_peak.json`` and only ever raised.
    """
    key = _machine_key(device, dtype)
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoseek" / "matmul_peak.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    measured = _measure_matmul_flops(device, dtype)
    if measured > known.get(key, 0.0):
        known[key] = measured
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(known, indent=1) + "\n")
        except OSError:  # a read-only home: the figure is still right for this process
            pass
    return max(measured, known.get(key, 0.0))
