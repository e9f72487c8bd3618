"""nanoseek's own int8 / int4 CPU products (csrc/gemv.cpp), built on first use, with torch's as fallback.

    from nanoseek.quant import cpu_kernels
    if cpu_kernels.enabled():                  # cheap: env, CPU flags, a compiler; builds nothing
        ext = cpu_kernels.kernels()            # the built extension, or None (logged once)
        y = cpu_kernels.int8_mm(x, q, scale)   # fp32 [M, N]; None when the extension is unusable
        y = cpu_kernels.int4_mm(x, packed, scale, zero)
        y = cpu_kernels.int8_mm_experts(h, q, scale, ids)   # [E, N, K] stacked: row i uses expert ids[i]

What they compute (gemv.cpp says how): x [M, K] @ W^T for int8 W = q * scale[n] (q int8 [N, K],
scale bf16 [N]) and int4 W = (codes - 8) * scale + zero per group of g inputs, the codes in
nanoseek's on-disk int4 layout (uint8 [N, K/2], column 2j in the low nibble and 2j+1 in the high
one; scale and zero = wmin + 8 * scale bf16 [N, K/g]). The activation rows are quantized, one
scale per block of inputs: to int16 in blocks of 64 for int8 weights (its rounding is below bf16's),
to int8 in blocks of 32 for int4 weights (~0.5% per product, beside int4's own ~8%). The products
run as AVX-512 VNNI integer dot products, split over output rows on torch's intra-op threads. K
must be a multiple of 64.

The extension is compiled with torch.utils.cpp_extension (g++ -O3 -march=native, ninja) into
~/.cache/nanoseek/extensions/ (or $NANOSEEK_EXT_DIR) the first time a quantized product asks for
it (tens of seconds, once per CPU model and source version), never at import. Set
NANOSEEK_NO_EXT=1 to skip it: the quantized modules then run torch's weight-only kernels, as they
also do when no compiler is found, the build fails, or the CPU lacks AVX-512 VNNI (each said once
in the log).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

__all__ = ["ENV_DISABLE", "REQUIRED_FLAGS", "K_MULTIPLE", "enabled", "kernels", "int8_mm", "int4_mm", "int8_mm_experts",
           "int4_mm_experts", "shape_ok"]

log = logging.getLogger(__name__)

ENV_DISABLE = "NANOSEEK_NO_EXT"
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma")
K_MULTIPLE = 64  # the kernels step over inputs 64 at a time
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without it the loop runs on one thread
CFLAGS, LDFLAGS = ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "gemv.cpp"

_lock = threading.Lock()
_state: dict = {}  # "ext": the loaded module, or None once it failed; "cpu": why the CPU cannot (None: it can)


def _cpu_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ('', set()) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "") not in ("", "0")


def _why_not() -> str | None:
    """Why this machine cannot run the extension (checked once, without building it), or None."""
    if "cpu" not in _state:
        name, flags = _cpu_flags()
        missing = [f for f in REQUIRED_FLAGS if f not in flags]
        if platform.machine() not in ("x86_64", "AMD64"):
            _state["cpu"] = f"not an x86-64 CPU ({platform.machine()})"
        elif missing:
            _state["cpu"] = f"the CPU lacks {', '.join(missing)}"
        elif not (shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja")):
            _state["cpu"] = "no C++ compiler (c++ or $CXX) or no ninja on PATH"
        else:
            _state["cpu"] = None
            _state["cpu_id"] = hashlib.sha1((name + " ".join(sorted(flags))).encode()).hexdigest()[:8]
    return _state["cpu"]


def enabled() -> bool:
    """True if the extension may be used here: not disabled (NANOSEEK_NO_EXT), an x86-64 CPU with
    AVX-512 VNNI, a compiler, no failed build yet. Builds nothing; ``kernels()`` can still fail."""
    return not _disabled() and _why_not() is None and _state.get("ext", True) is not None


def kernels():
    """The built extension module, building it on the first call; None where it cannot be used
    (disabled by NANOSEEK_NO_EXT, or a reason logged once: the CPU, no compiler, a failed build)."""
    if _disabled():
        return None
    if "ext" not in _state:
        with _lock:
            if "ext" not in _state:
                _state["ext"] = _load()
    return _state["ext"]


def _load():
    """Build (or find built) and import the extension; None, logged, where that fails."""
    reason, ext = _why_not(), None
    if reason is None:
        try:
            ext = _build()
            if not ext.available():
                reason, ext = "the built extension found no AVX-512 VNNI", None
        except Exception as e:  # a failed build must never stop the model: torch's kernels remain
            reason = f"the build failed ({type(e).__name__}: {e}; build directory {_build_dir()})"
    if reason is not None:
        log.warning("nanoseek CPU kernels not used, torch's weight-only kernels instead: %s", reason)
    return ext


def _build():
    from torch.utils.cpp_extension import load  # slow to import: only when building

    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("building nanoseek CPU kernels in %s (once)", build_dir)
    return load(name=build_dir.name, sources=[str(SOURCE)], build_directory=str(build_dir),
                extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False)


def _build_dir() -> Path:
    """One build per source version, compiler flags and CPU model (-march=native code must not
    meet another CPU)."""
    src_hash = hashlib.sha1(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:8]
    root = Path(os.environ.get("NANOSEEK_EXT_DIR", Path.home() / ".cache" / "nanoseek" / "extensions"))
    return root / f"nanoseek_gemv_{src_hash}_{_state.get('cpu_id', 'cpu')}"


def shape_ok(in_features: int) -> bool:
    """Whether the kernels take a weight with this many inputs."""
    return in_features % K_MULTIPLE == 0


def _usable(x: torch.Tensor, in_features: int):
    """The extension if it can run this product (CPU tensor, K a multiple of 64, not disabled, no
    gradient wanted: the kernels have no backward, and torch's say so), else None. The per-call
    path of the products: a few attribute, dictionary and environment lookups."""
    if (x.device.type != "cpu" or in_features % K_MULTIPLE or _disabled()
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    ext = _state.get("ext", False)
    return kernels() if ext is False else ext


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ (q int8 [N, K] * scale bf16 [N])^T -> fp32 [M, N]; None if the extension cannot
    run it (not built, not a CPU tensor, K not a multiple of 64): the caller falls back."""
    ext = _usable(x, q.shape[1])
    return None if ext is None else ext.int8_gemm(_rows(x), q, scale)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ W^T for int4 W = (codes - 8) * scale + zero, codes in nanoseek's layout (packed uint8
    [N, K/2]), scale/zero bf16 [N, K/g] -> fp32 [M, N]; None if the extension cannot run it (the
    caller falls back). The weights must be contiguous (the modules' buffers and their [e] slices are)."""
    ext = _usable(x, 2 * packed.shape[1])
    return None if ext is None else ext.int4_gemm(_rows(x), packed, scale, zero)


def int8_mm_experts(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    """Chosen experts at once: row i of the fp32 [n, N] result is x[i] (or x[0] if x has one row) @
    W[ids[i]]^T for stacked int8 W (q [E, N, K], scale bf16 [E, N]); None if the extension cannot run it."""
    ext = _usable(x, q.shape[-1])
    return None if ext is None else ext.int8_gemm_experts(_rows(x), q, scale, ids)


def int4_mm_experts(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor | None:
    """As ``int8_mm_experts`` for stacked int4 W in the native layout (packed [E, N, K/2], scale/zero
    bf16 [E, N, K/g])."""
    ext = _usable(x, 2 * packed.shape[-1])
    return None if ext is None else ext.int4_gemm_experts(_rows(x), packed, scale, zero, ids)
