"""The sandbox: model-written code runs in a separate limited process; a forever loop, an unbounded
allocation or an endless print is stopped and scored 0, and the calling process carries on."""

import time

from nanoseek.data.tasks import Example
from nanoseek.rl.rewards import code_reward
from nanoseek.rl.sandbox import run_python


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
    scores = [code_reward("", wrap.format(p), ex, timeout_s=1.0, memory_mb=128) for p in programs]
    assert scores == [0.0, 0.0, 1.0]
    assert time.perf_counter() - t0 < 10
