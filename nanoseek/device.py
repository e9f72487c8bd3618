"""Where a model runs and in what dtype: one rule for every command.

    device = resolve_device("cuda:1")             # a clear error when that device is not there
    dtype = inference_dtype(device, "auto")       # bf16 on CUDA; the checkpoint's own on a CPU (None)

On a CPU the checkpoint's dtype is kept: fp32 decoding streams weights as fast as bf16 there
(BENCHMARKS.md, no AMX on the machine measured), and a bf16 checkpoint stays bf16 so a large model
fits. On CUDA, bf16 is the default: tensor-core matmuls and half the bytes.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' (or None: cpu) as a torch.device that exists on this machine."""
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return device


def inference_dtype(device: torch.device, name: str = "auto") -> torch.dtype | None:
    """The compute dtype for `name` ('auto' or a DTYPES key); None means the checkpoint's own."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]
