"""The sandbox: model-written code runs in a separate limited process tree; a forever loop, an unbounded
allocation or an endless print is stopped and scored 0, and the calling process carries on; and each
escape issue 16 found is refused (write outside, kill outside, setsid outliving the limit, early exit
scoring 1.0, fork bomb as root)."""

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from nanoseek.data.tasks import Example
from nanoseek.rl.rewards import code_reward, passes_tests
from nanoseek.rl.sandbox import namespaces_available, run_python


def test_runs_code_and_captures_output():
    r = run_python("import sys\nprint(sum(range(10)))\nprint('err', file=sys.stderr)", timeout_s=5)
    assert r.ok and r.reason == "ok" and r.returncode == 0
    assert r.stdout == "45\n" and "err" in r.stderr


def test_stdin_and_errors():
    r = run_python("x = input()\nprint(int(x) * 2)", stdin="21\n")
    assert r.ok and r.stdout.strip() == "42"
    r = run_python("raise SystemExit(3)")
    assert not r.ok and r.reason == "error" and r.returncode == 3


def test_infinite_loop_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert not r.ok and r.reason in ("timeout", "cpu_limit")
    assert time.perf_counter() - t0 < 5


def test_sleeping_program_is_killed_at_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", timeout_s=0.5)
    assert not r.ok and r.reason == "timeout" and r.wall_s < 5


def test_memory_bomb_is_stopped():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", timeout_s=10, memory_mb=128)
    assert not r.ok and r.reason == "memory_limit"
    r = run_python("x = bytearray(10**11)", memory_mb=128)
    assert not r.ok and r.reason == "memory_limit"


def test_endless_output_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", timeout_s=5, output_kb=64)
    assert not r.ok and r.reason == "output_limit" and len(r.stdout) <= 64 * 1024


def test_fork_bomb_is_contained():
    r = run_python("import os\nfor _ in range(10**6):\n    os.fork()", timeout_s=1.0)
    assert not r.ok


def test_no_network_where_the_kernel_allows_it():
    code = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)"
    r = run_python(code, timeout_s=5)
    assert not r.ok
    if r.network_isolated:
        assert "unreachable" in r.stderr or "Errno" in r.stderr


def test_trainer_carries_on_after_bad_programs():
    """A reward loop meets a forever loop and a memory bomb, scores both 0, and keeps scoring."""
    ex = Example("Write f.", "", "", {"tests": "assert f() == 1"})
    wrap = "</think>\n```python\n{}\n```"
    programs = ["def f():\n    while True:\n        pass\nf()",
                "def f():\n    return bytearray(10**11)\nf()",
                "def f():\n    return 1"]
    t0 = time.perf_counter()
    scores = [float(passes_tests(wrap.format(p), ex.meta["tests"], timeout_s=1.0, memory_mb=128)) for p in programs]
    assert scores == [0.0, 0.0, 1.0]
    assert time.perf_counter() - t0 < 10


# ----------------------------------------------------------------------------- escapes (issue 16)

needs_ns = pytest.mark.skipif(not namespaces_available(), reason="no Linux namespaces here")


@needs_ns
def test_cannot_write_outside_its_directory(tmp_path):
    """Even a world-writable file is refused: the whole filesystem is mounted read-only."""
    target = tmp_path / "victim.txt"
    target.write_text("safe")
    target.chmod(0o666)
    r = run_python(f"open({str(target)!r}, 'w').write('pwned')")
    assert not r.ok and "Read-only file system" in r.stderr
    assert target.read_text() == "safe"
    r = run_python(f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')")
    assert not r.ok and not (tmp_path / "new.txt").exists()
    assert run_python("open('scratch', 'w').write('x')\nprint(open('scratch').read())").stdout == "x\n"


@needs_ns
def test_cannot_kill_processes_outside():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        r = run_python(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)")
        assert not r.ok and ("ProcessLookupError" in r.stderr or "PermissionError" in r.stderr)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def _alive(marker: str) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                found.append(p.name)
        except OSError:
            pass
    return found


@needs_ns
@pytest.mark.parametrize("main_waits", [False, True])
def test_setsid_child_does_not_outlive_the_run(main_waits):
    """A double-forked, setsid() child dies with the run: at normal exit and at the deadline."""
    marker = f"{time.time_ns() % 10**9}.25"
    code = textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv('/bin/sleep', ['sleep', '{marker}'])
            os._exit(0)
        time.sleep(0.3)
        {'time.sleep(60)' if main_waits else ''}
    """)
    r = run_python(code, timeout_s=1.0)
    assert r.ok != main_waits
    time.sleep(0.2)
    assert _alive(marker) == []


def test_early_exit_does_not_pass_the_tests():
    for exit_early in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"):
        r = run_python(exit_early, tests="assert False")
        assert not r.ok and r.reason == "error"
    ex = Example("Write f.", "", "", {"tests": "assert f() == 2"})
    hack = "</think>\n```python\nimport os\ndef f():\n    return 1\nos._exit(0)\n```"
    assert code_reward([""], [hack], example=[ex]) == [0.0]


def test_the_nonce_cannot_be_read_by_introspection():
    for steal in ("import gc\ngc.get_objects()", "import ctypes", "import sys\nsys._current_frames()",
                  "open('/proc/self/mem', 'rb')"):
        r = run_python(steal)
        assert not r.ok and ("not allowed" in r.stderr or "not readable" in r.stderr), steal


@needs_ns
@pytest.mark.skipif(os.getuid() != 0, reason="the root case: RLIMIT_NPROC binds other users anyway")
def test_fork_bomb_as_root_hits_the_process_limit():
    code = textwrap.dedent("""
        import os, time
        n = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(10)
                    os._exit(0)
                n += 1
        except OSError:
            print(n)
    """)
    r = run_python(code, timeout_s=5, max_processes=8)
    assert r.ok and int(r.stdout) < 8
    t0 = time.perf_counter()
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                   timeout_s=1.0)
    assert not r.ok and time.perf_counter() - t0 < 5
