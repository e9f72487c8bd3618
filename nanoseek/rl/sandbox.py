"""Run untrusted, model-written Python in an isolated, limited process tree.

    result = run_python("print(sum(range(10)))", timeout_s=2.0, memory_mb=256)
    result.ok, result.stdout, result.reason      # True, "45\\n", "ok"
    result = run_python(solution, tests="assert f(2) == 4")   # ok only if the tests ran to the end

The only place nanoseek executes code a model wrote. Where Linux namespaces are available
(`unshare` from util-linux; root, or unprivileged user namespaces), the program gets:
  * its own PID namespace: it cannot see or signal any process outside it, and when the
    namespace's init ends, for whatever reason, the kernel kills every process left in it; so a
    `setsid()` or double-forked child cannot outlive the run, and at the deadline one SIGKILL to
    the tree's root ends everything (`unshare --kill-child`);
  * its own mount namespace with every mount made read-only recursively (mount_setattr), except
    an empty working directory bind-mounted writable; a fresh /proc of its own namespace;
  * its own network namespace (only a loopback that is down): no network;
  * when started as root, a fresh unprivileged uid/gid picked per run, so RLIMIT_NPROC (which the
    kernel skips for root) caps its process count, and file permissions apply to it as well;
  * RLIMIT_CPU, RLIMIT_AS (address space: an unbounded allocation fails with MemoryError),
    RLIMIT_FSIZE (stdout/stderr are files, so an endless print is cut off), RLIMIT_NOFILE, no
    core dumps; `python -I -S` with a minimal environment;
  * a result channel it cannot forge by exiting or printing: the harness reads a random nonce
    from a pipe and closes it before the program runs, and writes the nonce to a second pipe only
    after the program and its tests have run to the end. An early `os._exit(0)`, `sys.exit(0)`
    or a printed "OK" leaves the nonce unwritten and the run failed. An audit hook refuses the
    direct routes to the nonce in memory (gc's object lists, ctypes, /proc/self/mem, other
    threads' frames). Left open, stated plainly: the program shares the interpreter with the
    harness, so code that walks frames upward (sys._getframe().f_back) to the harness's locals
    can still read it; a deliberate attack, not an accident a policy stumbles into.
Without namespaces (macOS, a container without CAP_SYS_ADMIN or user namespaces) the program
runs with the resource limits and the nonce channel only, in its own session, and the result
says `isolated=False` (a warning is printed once). Not a boundary against kernel exploits:
there is no seccomp filter.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# PID 1 of the sandbox's namespaces: read-only mounts, then the program under a fresh uid.
_INIT = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)

def check(ok, what):
    if not ok:
        os.write(2, f"sandbox init: {what} failed: {os.strerror(ctypes.get_errno())}\n".encode())
        os._exit(121)

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

def setattr_(path, set_=0, clr=0, flags=0):  # mount_setattr(2), Linux 5.12; 442 on every arch but alpha
    attr = MountAttr(set_, clr, 0, 0)
    return libc.syscall(442, -100, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)) == 0

work = cfg["work"]
check(libc.mount(work.encode(), work.encode(), None, 4096 | 16384, None) == 0, "bind work dir")  # MS_BIND|MS_REC
check(setattr_("/", set_=1, flags=0x8000), "read-only /")                       # MOUNT_ATTR_RDONLY, AT_RECURSIVE
check(setattr_(work, clr=1), "writable work dir")
pid = os.fork()
if pid == 0:
    check(libc.prctl(38, 1, 0, 0, 0) == 0, "no_new_privs")  # PR_SET_NO_NEW_PRIVS: no setuid binaries
    if cfg["uid"] is not None:
        # A fresh uid (so RLIMIT_NPROC binds) that keeps one capability, CAP_DAC_READ_SEARCH, so the
        # interpreter is readable wherever it is installed (e.g. under a 0700 /root): read-only anyway.
        check(libc.prctl(8, 1, 0, 0, 0) == 0, "keepcaps")  # PR_SET_KEEPCAPS
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        caps = (ctypes.c_uint32 * 6)(1 << 2, 1 << 2, 1 << 2, 0, 0, 0)  # effective, permitted, inheritable
        check(libc.capset(header, caps) == 0, "capset")
        check(libc.prctl(47, 2, 2, 0, 0) == 0, "ambient CAP_DAC_READ_SEARCH")  # PR_CAP_AMBIENT_RAISE
    for kind, value in cfg["limits"]:
        resource.setrlimit(kind, (value, value))
    os.chdir(work)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
while True:  # PID 1 reaps every orphan; it ends with the program, taking the namespace with it
    try:
        done, status = os.wait()
    except ChildProcessError:
        os._exit(120)
    if done == pid:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
'''

# Runs the program, then its tests, in one interpreter; writes the nonce only when both finish.
_HARNESS = r'''
import os, sys

def main(nonce_fd, result_fd):
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    program = open("../code/program.py", encoding="utf-8").read()
    tests = open("../code/tests.py", encoding="utf-8").read()
    # Code in this interpreter could read the nonce from memory: refuse the direct routes (the gc
    # object lists, ctypes, /proc/self/mem, other threads' frames, tracers). Walking frames up from
    # its own (sys._getframe().f_back...) stays possible: enum and typing need sys._getframe.
    blocked_events = {"sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
                      "gc.get_referents", "sys.settrace", "sys.setprofile", "ctypes.dlopen", "ctypes.dlsym",
                      "ctypes.cdata", "ctypes.addressof"}

    def audit(event, args):
        if event in blocked_events:
            raise RuntimeError(f"sandbox: {event} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes)) and \
                os.fsdecode(args[0]).startswith(("/proc", "/dev/fd")):
            raise RuntimeError("sandbox: /proc is not readable")
        if event == "import" and args[0] in ("ctypes", "_ctypes"):
            raise RuntimeError(f"sandbox: import {args[0]} is not allowed")

    sys.addaudithook(audit)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "program.py", "exec"), scope)
        exec(compile(tests, "tests.py", "exec"), scope)
    except SystemExit as e:  # an exit before the tests finished: never a pass
        code = e.code if isinstance(e.code, int) else (e.code is not None)
        sys.stdout.flush()
        os._exit(code)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(result_fd, nonce)
    os._exit(0)

main(int(sys.argv[1]), int(sys.argv[2]))
'''

_warned = False


@dataclass
class SandboxResult:
    """What happened to one program. `reason`: "ok", "error" (an exception, a nonzero exit, or an
    exit before the tests finished), "timeout" (wall clock), "cpu_limit", "memory_limit",
    "output_limit" or "killed" (another signal). `isolated`: namespaces were used (see module)."""
    ok: bool
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolated: bool

    @property
    def network_isolated(self) -> bool:
        return self.isolated


def namespaces_available() -> bool:
    """True when `unshare` can give a program its own PID, mount and network namespaces here."""
    global _NS
    if _NS is None:
        exe = shutil.which("unshare")
        _NS = bool(exe) and subprocess.run(
            [exe, *_unshare_flags(), "true"], capture_output=True, timeout=10).returncode == 0
    return _NS


_NS: bool | None = None


def _unshare_flags() -> list[str]:
    user = [] if os.getuid() == 0 else ["--user", "--map-root-user"]
    return [*user, "--pid", "--fork", "--kill-child", "--mount", "--net", "--mount-proc"]


def _limits(cpu_s: int, memory_bytes: int, output_bytes: int, nproc: int, capped: bool) -> list[tuple[int, int]]:
    out = [(resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_FSIZE, output_bytes),
           (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64)]
    if capped:  # root ignores RLIMIT_NPROC: only set where it binds (a fresh uid, or not root)
        out.append((resource.RLIMIT_NPROC, nproc))
    return out


def _unisolated_setup(limits: list[tuple[int, int]]) -> None:
    """Between fork and exec when namespaces are unavailable: the limits only."""
    for kind, value in limits:
        soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))


def run_python(code: str, tests: str = "", timeout_s: float = 5.0, memory_mb: int = 256, cpu_s: float | None = None,
               stdin: str = "", output_kb: int = 256, max_processes: int = 16) -> SandboxResult:
    """Run `code`, then `tests` (Python source, typically asserts), in the sandbox; never raises
    for what the code does. ok: both ran to the end and the harness reported so through its channel.

    timeout_s: wall clock before the whole process tree is killed. cpu_s: CPU-seconds limit
    (default: timeout_s rounded up). memory_mb: address-space limit per process. output_kb: the
    most the program may write to stdout and to stderr. max_processes: processes and threads.
    """
    if not isinstance(code, str) or not isinstance(tests, str):
        raise ValueError(f"code and tests must be str, got {type(code).__name__} and {type(tests).__name__}")
    if not timeout_s > 0 or memory_mb < 16 or output_kb < 1 or max_processes < 1:
        raise ValueError(f"timeout_s={timeout_s}, memory_mb={memory_mb}, output_kb={output_kb}, max_processes="
                         f"{max_processes}: need timeout_s > 0, memory_mb >= 16, output_kb >= 1, max_processes >= 1")
    cpu = max(1, int(-(-(cpu_s or timeout_s) // 1)))
    isolated = namespaces_available()
    _warn_once(isolated)
    uid = random.randrange(200_000, 2_000_000) if isolated and os.getuid() == 0 else None
    limits = _limits(cpu, memory_mb << 20, output_kb << 10, max_processes, capped=uid is not None or os.getuid() != 0)
    with tempfile.TemporaryDirectory(prefix="nanoseek-sandbox-") as tmp:
        tmp = Path(tmp)
        (tmp / "code").mkdir()
        work = tmp / "work"
        work.mkdir()
        for name, text in (("program.py", code), ("tests.py", tests), ("harness.py", _HARNESS)):
            (tmp / "code" / name).write_text(text, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chmod(tmp, 0o755)
        nonce, (nonce_r, nonce_w), (result_r, result_w) = os.urandom(32).hex().encode(), os.pipe(), os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        argv = [sys.executable, "-I", "-S", "../code/harness.py", str(nonce_r), str(result_w)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(work)}
        if isolated:
            cfg = {"work": str(work), "uid": uid, "limits": limits, "argv": argv, "env": env}
            cmd, preexec = [shutil.which("unshare"), *_unshare_flags(), sys.executable, "-I", "-S", "-c", _INIT,
                            json.dumps(cfg)], None
        else:
            cmd, preexec = argv, (lambda: _unisolated_setup(limits))
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, pass_fds=(nonce_r, result_w), preexec_fn=preexec)
        os.close(nonce_r)
        os.close(result_w)
        timed_out = False
        try:
            proc.communicate(stdin.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_tree(proc)
        wall = time.perf_counter() - t0
        with os.fdopen(result_r, "rb") as f:
            reported = f.read(len(nonce) + 1) == nonce
        stdout, stderr = ((tmp / p).read_bytes()[: output_kb << 10].decode("utf-8", "replace")
                          for p in ("stdout", "stderr"))
    reason = _reason(proc.returncode, timed_out, stderr, reported)
    return SandboxResult(reason == "ok", reason, proc.returncode, stdout, stderr, wall, isolated)


def _warn_once(isolated: bool) -> None:
    global _warned
    if not isolated and not _warned:
        _warned = True
        warnings.warn("sandbox: Linux namespaces are unavailable here (no `unshare`, or not permitted); "
                      "model-written code runs with resource limits only: it can read and write what this "
                      "user can and reach the network", RuntimeWarning, stacklevel=3)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the session; with namespaces, unshare's death kills the namespace's init (its
    --kill-child), and the kernel then kills every process left in the namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _reason(returncode: int | None, timed_out: bool, stderr: str, reported: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode is not None and returncode > 128:  # the namespace init's 128 + signal
        returncode = 128 - returncode
    if returncode == 0:
        return "ok" if reported else "error"
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
