"""Sandbox: each hostile program is contained, scores 0, and this test process survives.

Namespace-specific guarantees (writes outside, signals to the parent, hidden processes) are checked
only where the sandbox runs with namespaces (root on Linux); the rest hold in both modes.
"""

import os
import socket

import pytest

from rewards.code import CodeTests
from rewards.sandbox import Sandbox, SandboxLimits, namespaces_available

needs_namespaces = pytest.mark.skipif(not namespaces_available(), reason="needs root and Linux namespaces")


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_s=5, memory_mb=512, nproc=32, output_bytes=4096), workers=2)


def test_clean_program_runs(sandbox):
    result = sandbox.run("import json\nprint(json.dumps({'ok': 2 + 2}))")
    assert result.ok and result.stdout.strip() == '{"ok": 4}'


def test_infinite_loop_is_killed():
    result = Sandbox(SandboxLimits(wall_s=1)).run("while True:\n    pass")
    assert result.timed_out and not result.ok


def test_fork_bomb_is_contained(sandbox):
    result = sandbox.run("import os\nwhile True:\n    os.fork()")
    assert not result.ok
    assert sandbox.run("print('after')").stdout == "after\n"  # the machine still runs programs


def test_memory_bomb_is_contained(sandbox):
    result = sandbox.run("x = bytearray(4 * 1024 ** 3)")
    assert not result.ok and "MemoryError" in result.stderr


def test_huge_output_is_capped(sandbox):
    result = sandbox.run("import sys\nfor _ in range(20000):\n    sys.stdout.write('x' * 1000)")
    assert result.ok and len(result.stdout) == 4096


def test_parent_secret_is_not_visible(sandbox, monkeypatch):
    monkeypatch.setenv("FOO_SECRET", "hunter2")
    result = sandbox.run("import os\nprint(os.environ.get('FOO_SECRET'))\nprint(sorted(os.environ))")
    assert result.ok and "hunter2" not in result.stdout and "FOO_SECRET" not in result.stdout


def test_network_to_loopback_server_is_refused(sandbox):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
        server.settimeout(0.2)  # a completed handshake would be waiting in the backlog by now
        with pytest.raises(TimeoutError):
            server.accept()
    assert not result.ok and "connected" not in result.stdout


@needs_namespaces
def test_writes_outside_do_not_land(sandbox, tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable host directory stays out of reach
    shared_tmp = f"/tmp/align-sandbox-escape-{os.getpid()}"
    code = (f"for path in [{str(target)!r}, {shared_tmp!r}, '/var/tmp/escape', '/work-escape']:\n"
            "    try:\n        open(path, 'w').write('x')\n    except OSError as exc:\n        print(type(exc).__name__)")
    result = sandbox.run(code)
    assert result.ok
    assert not target.exists() and not os.path.exists(shared_tmp) and not os.path.exists("/var/tmp/escape")
    assert not os.path.exists("/work-escape")


@needs_namespaces
def test_cannot_kill_parent_or_see_processes(sandbox):
    code = ("import os, signal\nprint(os.getuid(), len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
            "for pid in (os.getppid(), -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n")
    result = sandbox.run(code)
    uid, visible = result.stdout.split()
    assert uid == "65534" and int(visible) <= 2  # itself (PID 1) only; the host's processes are hidden
    assert sandbox.run("print(1)").ok  # we are alive and still running programs


def test_rlimits_fallback_blocks_network(sandbox):
    plain = Sandbox(SandboxLimits(wall_s=5), isolation="rlimits")
    assert plain.run("print(2)").stdout == "2\n"
    assert "network access is disabled" in plain.run("import socket\nsocket.create_connection(('127.0.0.1', 9))").stderr


def test_code_tests_scores():
    reward = CodeTests(wall_s=1.5, workers=2)
    completions = ["```python\ndef f(x):\n    return x * 2\n```", "def f(x):\n    while True: pass",
                   "def f(x):\n    return x * 2 if x else 1", "```python\nimport os\nos.fork()\n```"]
    tests = [["assert f(2) == 4", "assert f(0) == 0"], "assert f(1) == 2",
             ["assert f(2) == 4", "assert f(0) == 0"], []]
    assert reward(prompts=[""] * 4, completions=completions, tests=tests) == [1.0, 0.0, 0.5, None]
