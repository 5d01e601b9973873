"""Sandbox: what holds in every isolation mode (the default one here), the rlimits fallback and its
warning, and the code_tests reward. The escape suite, per containing mode: test_sandbox_escape.py.
"""

import logging
import socket

import pytest

import rewards.sandbox
from rewards.code import CodeTests
from rewards.sandbox import Sandbox, SandboxLimits, available_isolations


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_s=5, memory_mb=512, nproc=32, output_bytes=4096), workers=2)


def test_clean_program_runs(sandbox):
    result = sandbox.run("import json\nprint(json.dumps({'ok': 2 + 2}))")
    assert result.ok and result.stdout.strip() == '{"ok": 4}'


def test_infinite_loop_is_killed():
    result = Sandbox(SandboxLimits(wall_s=1)).run("while True:\n    pass")
    assert result.timed_out and not result.ok


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


def test_rlimits_fallback_blocks_network_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(rewards.sandbox, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="rewards.sandbox"):
        plain = Sandbox(SandboxLimits(wall_s=5), isolation="rlimits")
        Sandbox(SandboxLimits(wall_s=5), isolation="rlimits")
    assert [r.message.split(":")[0] for r in caplog.records] == ["SANDBOX NOT CONTAINED"]
    assert plain.run("print(2)").stdout == "2\n"
    assert "network access is disabled" in plain.run("import socket\nsocket.create_connection(('127.0.0.1', 9))").stderr
    traced = plain.run("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                       "print(libc.ptrace(0, 0, None, None), os.strerror(ctypes.get_errno()))")
    assert traced.stdout == "-1 Operation not permitted\n"  # the seccomp filter applies here too


def test_isolation_is_reported_and_checked():
    assert Sandbox().isolation == available_isolations()[0]
    assert available_isolations()[-1] == "rlimits"
    with pytest.raises(ValueError, match="one of bwrap, namespaces, rlimits"):
        Sandbox(isolation="chroot")


def test_code_tests_scores():
    reward = CodeTests(wall_s=1.5, workers=2)
    completions = ["```python\ndef f(x):\n    return x * 2\n```", "def f(x):\n    while True: pass",
                   "def f(x):\n    return x * 2 if x else 1", "```python\nimport os\nos.fork()\n```"]
    tests = [["assert f(2) == 4", "assert f(0) == 0"], "assert f(1) == 2",
             ["assert f(2) == 4", "assert f(0) == 0"], []]
    assert reward(prompts=[""] * 4, completions=completions, tests=tests) == [1.0, 0.0, 0.5, None]
