"""Run untrusted, model-written Python in a separate, limited process.

    result = run_python("print(sum(range(10)))", timeout_s=2.0, memory_mb=256)
    result.ok, result.stdout, result.reason      # True, "45\\n", "ok"

The only place nanoseek executes code a model wrote. The child process gets:
  * its own session (process group), killed as a whole with SIGKILL at the wall-clock timeout;
  * RLIMIT_CPU (CPU seconds; the kernel sends SIGXCPU/SIGKILL), RLIMIT_AS (address space, so an
    unbounded allocation fails with MemoryError instead of taking the machine), RLIMIT_FSIZE
    (stdout/stderr go to files, so an endless print is cut off too), RLIMIT_NOFILE, no core dumps;
    RLIMIT_NPROC to stop fork bombs where the kernel enforces it (not for root);
  * no network where the kernel allows it: a new user + network namespace (only a loopback
    that is down); where that fails `network_isolated` is False in the result;
  * an empty temporary working directory, a minimal environment, and `python -I` (no user site,
    no PYTHONPATH, no current directory on sys.path).
This stops accidents and runaway loops. It is not a security boundary against a determined
attacker (there is no seccomp filter and the filesystem is visible read-only as the user sees it).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


@dataclass
class SandboxResult:
    """What happened to one program. `reason`: "ok", "error" (nonzero exit), "timeout" (wall
    clock), "cpu_limit", "memory_limit", "output_limit" or "killed" (another signal)."""
    ok: bool
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    network_isolated: bool


def _limit(kind: int, value: int) -> None:
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def _child_setup(cpu_s: int, memory_bytes: int, output_bytes: int, isolate_network: bool,
                 status_fd: int) -> None:
    """Runs in the child between fork and exec: limits, then (if possible) an empty network."""
    _limit(resource.RLIMIT_CPU, cpu_s)
    _limit(resource.RLIMIT_AS, memory_bytes)
    _limit(resource.RLIMIT_FSIZE, output_bytes)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, 64)
    isolated = False
    if isolate_network:
        libc = ctypes.CDLL(None, use_errno=True)
        isolated = libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0 or libc.unshare(_CLONE_NEWNET) == 0
    os.write(status_fd, b"1" if isolated else b"0")
    os.close(status_fd)
    if os.getuid() != 0:  # root ignores RLIMIT_NPROC; for others it stops fork bombs
        _limit(resource.RLIMIT_NPROC, 0)


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, cpu_s: float | None = None,
               stdin: str = "", output_kb: int = 256, isolate_network: bool = True) -> SandboxResult:
    """Run `code` with `python -I` in a limited child process; never raises for what the code does.

    timeout_s: wall clock before the whole process group is killed. cpu_s: CPU-seconds limit
    (default: timeout_s rounded up). memory_mb: address-space limit. output_kb: the most the
    program may write to stdout plus stderr (each is a file capped at this size).
    """
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not timeout_s > 0 or memory_mb < 16 or output_kb < 1:
        raise ValueError(f"timeout_s={timeout_s}, memory_mb={memory_mb}, output_kb={output_kb}: need "
                         "timeout_s > 0, memory_mb >= 16 and output_kb >= 1")
    cpu = max(1, int(-(-(cpu_s or timeout_s) // 1)))
    with tempfile.TemporaryDirectory(prefix="nanoseek-sandbox-") as tmp:
        tmp = Path(tmp)
        (tmp / "program.py").write_text(code, encoding="utf-8")
        out_path, err_path = tmp / "stdout", tmp / "stderr"
        read_fd, write_fd = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(tmp)}
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "program.py"], cwd=tmp, env=env, stdin=subprocess.PIPE,
                stdout=out, stderr=err, start_new_session=True, pass_fds=(write_fd,),
                preexec_fn=lambda: _child_setup(cpu, memory_mb << 20, output_kb << 10, isolate_network,
                                                write_fd))
        os.close(write_fd)
        timed_out = False
        try:
            proc.communicate(stdin.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
        wall = time.perf_counter() - t0
        with os.fdopen(read_fd, "rb") as f:
            isolated = f.read(1) == b"1"
        stdout, stderr = (p.read_bytes()[: output_kb << 10].decode("utf-8", "replace") for p in (out_path, err_path))
    reason = _reason(proc.returncode, timed_out, stderr)
    return SandboxResult(reason == "ok", reason, proc.returncode, stdout, stderr, wall, isolated)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it may have forked), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _reason(returncode: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig in (signal.SIGXCPU, signal.SIGKILL):  # soft then hard RLIMIT_CPU
            return "cpu_limit"
        if sig == signal.SIGXFSZ:
            return "output_limit"
        return "killed"
    if "MemoryError" in stderr:
        return "memory_limit"
    if "File too large" in stderr:  # RLIMIT_FSIZE reached: Python reports EFBIG
        return "output_limit"
    return "error"
