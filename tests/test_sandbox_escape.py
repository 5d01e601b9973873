"""Escape suite: hostile programs against every containing isolation mode available here.

Each case asserts the effect outside the sandbox (the file is absent, the listener got nothing, the
host process lives and is not traced, no process is left), not only the program's own report.
It runs as whatever user pytest runs as; CI runs it as root and as uid 65534 (.ci/run).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import rewards
from rewards.sandbox import Sandbox, SandboxLimits, available_isolations

CONTAINED = [mode for mode in available_isolations() if mode != "rlimits"]
pytestmark = pytest.mark.skipif(not CONTAINED, reason="no sandbox isolation beyond rlimits here (see docs/rewards.md)")
PROJECT = Path(rewards.__file__).resolve().parents[1]
SECRET = f"hunter2-{uuid.uuid4().hex}"


@pytest.fixture(scope="module", params=CONTAINED or ["none"])
def sandbox(request):
    return Sandbox(SandboxLimits(wall_s=5, memory_mb=512, nproc=32, output_bytes=4096), workers=2,
                   isolation=request.param)


@pytest.fixture
def marker():
    """A unique argv word: every process a program starts with it can be found on the host."""
    return f"align-escape-{uuid.uuid4().hex}"


@pytest.fixture
def sibling():
    """A host process of ours, next to the sandbox, that nothing in it may signal, trace or read
    (its environment holds the secret, so /proc/<pid>/environ shows it to anyone allowed)."""
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, "ALIGN_TEST_SECRET": SECRET})
    environ, deadline = Path(f"/proc/{proc.pid}/environ"), time.monotonic() + 10
    while SECRET.encode() not in environ.read_bytes():  # empty until the child's exec is done
        assert time.monotonic() < deadline, "the sibling never showed its environment"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def processes_with(marker: str, settle_s: float = 2.0) -> list[int]:
    """Host PIDs whose command line holds `marker`, after giving killed ones `settle_s` to go."""
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def try_each(paths: list[str], action: str) -> str:
    """Program text that runs `action` (with `path` bound) on each path and prints the outcome."""
    return (f"for path in {paths!r}:\n    try:\n        {action}\n        print('ESCAPED', path)\n"
            "    except OSError as exc:\n        print('refused', path, type(exc).__name__)\n")


def world_writable_dir(parent: Path, made: list[Path]) -> Path | None:
    """A fresh mode-0777 directory under `parent` (outside every temp dir), or None if we cannot."""
    if not os.access(parent, os.W_OK):
        return None
    path = parent / f".align-escape-{uuid.uuid4().hex}"
    path.mkdir()
    path.chmod(0o777)
    made.append(path)
    return path


def test_writes_land_only_in_the_work_dir(sandbox):
    made: list[Path] = []
    try:
        dirs = [d for d in (world_writable_dir(PROJECT, made), world_writable_dir(Path(sys.prefix), made)) if d]
        name = f"escaped-{uuid.uuid4().hex}"
        targets = [str(d / name) for d in dirs] + [str(PROJECT / name), str(Path.home() / name),
                                                   f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}"]
        code = try_each(targets, "open(path, 'w').write('x')") + \
            "open('inside.txt', 'w').write('ok')\nprint('work dir:', open('inside.txt').read())"
        result = sandbox.run(code)
        assert result.ok, result.stderr
        assert "work dir: ok" in result.stdout and "ESCAPED" not in result.stdout
        assert [t for t in targets if os.path.exists(t)] == []
    finally:
        for path in made:
            shutil.rmtree(path)


def test_root_only_file_is_unreadable(sandbox):
    if os.geteuid() == 0:  # a root-only file where the sandbox can see it
        if not os.access(sys.prefix, os.W_OK):
            pytest.skip(f"cannot place a root-only file in {sys.prefix}")
        secret = Path(sys.prefix, f".align-secret-{uuid.uuid4().hex}")
        secret.write_text(SECRET)
        secret.chmod(0o600)
    else:
        secret = Path("/etc/shadow")
        if not secret.exists() or os.access(secret, os.R_OK):
            pytest.skip("no root-only file readable only by root here")
    try:
        result = sandbox.run(try_each([str(secret)], "print(open(path).read())"))
    finally:
        if secret.name != "shadow":
            secret.unlink()
    assert result.ok and SECRET not in result.stdout
    assert "ESCAPED" not in result.stdout and "refused" in result.stdout


def test_network_reaches_no_host_listener(sandbox):
    addresses = ["127.0.0.1", "127.0.0.2"] + (["::1"] if socket.has_ipv6 and _ipv6_loopback() else [])
    servers, udps, targets = [], [], []
    try:
        for host in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            tcp = socket.create_server((host, 0), family=family)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((host, 0))
            servers.append(tcp)
            udps.append(udp)
            targets.append((host, tcp.getsockname()[1], udp.getsockname()[1]))
        code = ("import socket\n"
                f"for host, tcp_port, udp_port in {targets!r}:\n"
                "    family = socket.AF_INET6 if ':' in host else socket.AF_INET\n"
                "    try:\n        socket.create_connection((host, tcp_port), timeout=1).sendall(b'leak')\n"
                "        print('ESCAPED tcp', host)\n"
                "    except OSError as exc:\n        print('tcp refused', host, exc)\n"
                "    try:\n        socket.socket(family, socket.SOCK_DGRAM).sendto(b'leak', (host, udp_port))\n"
                "        print('sent udp', host)\n"
                "    except OSError as exc:\n        print('udp refused', host, exc)\n")
        result = sandbox.run(code)
        for tcp, udp in zip(servers, udps):
            tcp.settimeout(0.2)  # a completed handshake would be waiting in the backlog by now
            with pytest.raises(TimeoutError):
                tcp.accept()
            udp.settimeout(0.2)
            with pytest.raises(TimeoutError):
                udp.recvfrom(64)
    finally:
        for sock in servers + udps:
            sock.close()
    assert result.ok, result.stderr
    assert "ESCAPED" not in result.stdout


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_parent_secrets_are_not_visible(sandbox, monkeypatch, sibling):
    monkeypatch.setenv("ALIGN_TEST_SECRET", SECRET)
    code = ("import os\nprint(dict(os.environ))\n"
            f"for pid in {[sibling.pid, os.getpid(), os.getppid()]!r} + [os.getppid()] + os.listdir('/proc'):\n"
            "    try:\n        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
            "    except (OSError, ValueError) as exc:\n        print(pid, type(exc).__name__)\n")
    result = Sandbox(SandboxLimits(wall_s=5), isolation=sandbox.isolation).run(code)  # 64 KiB of output
    assert result.ok, result.stderr
    assert SECRET not in result.stdout + result.stderr and "ALIGN_TEST_SECRET" not in result.stdout


def test_orphans_do_not_outlive_the_run(sandbox, marker):
    code = ("import os, subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
            "print('left two behind')\n")
    result = sandbox.run(code)
    assert result.ok and not result.timed_out and result.seconds < 4, (result.stderr, result.seconds)
    assert processes_with(marker) == []


def test_ignoring_sigterm_does_not_help(sandbox, marker):
    """Timeout is SIGKILL to the group, which takes the PID namespace with it (setsid children too)."""
    code = ("import signal, subprocess, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            f"subprocess.Popen([sys.executable, '-c', 'import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
            f"while True: time.sleep(1)', {marker!r}], start_new_session=True)\nwhile True:\n    time.sleep(0.1)\n")
    result = Sandbox(SandboxLimits(wall_s=1), isolation=sandbox.isolation).run(code)
    assert result.timed_out and result.seconds < 3
    assert processes_with(marker) == []


def test_fork_bomb_is_contained(sandbox, marker):
    code = ("import subprocess, sys\n"
            f"subprocess.run([sys.executable, '-c', 'import os\\nwhile True:\\n    os.fork()', {marker!r}], check=True)\n")
    result = sandbox.run(code)
    assert not result.ok and result.seconds < 7
    assert processes_with(marker) == []
    assert sandbox.run("print('after')").stdout == "after\n"  # the machine still runs programs


def test_memory_bomb_is_contained(sandbox):
    result = sandbox.run("x = bytearray(4 * 1024 ** 3)")
    assert not result.ok and "MemoryError" in result.stderr


def test_huge_output_is_capped(sandbox):
    result = sandbox.run("import sys\nfor _ in range(20000):\n    sys.stdout.write('x' * 1000)")
    assert result.ok and len(result.stdout) == 4096 and result.seconds < 4


def test_cannot_kill_the_parent_or_a_sibling(sandbox, sibling):
    targets = [os.getpid(), sibling.pid, -os.getpgrp()]
    code = ("import os, signal\n"
            f"for pid in {targets!r} + [os.getppid(), -1]:\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('signalled', pid)\n"
            "    except OSError as exc:\n        print('refused', pid, type(exc).__name__)\n")
    result = sandbox.run(code)
    assert sibling.poll() is None  # and this test process is evidently alive
    assert result.returncode is not None and sandbox.run("print(1)").ok


def test_cannot_ptrace_a_sibling(sandbox, sibling):
    code = ("import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "child = os.fork()\nif child == 0:\n    time.sleep(30)\n    os._exit(0)\n"
            f"for pid in ({sibling.pid}, child):\n"
            "    ret = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH\n"
            "    print('attach', pid, ret, os.strerror(ctypes.get_errno()) if ret else 'ATTACHED')\n"
            "print('traceme', libc.ptrace(0, 0, None, None), os.strerror(ctypes.get_errno()))\n"
            "os.kill(child, 9)\n")
    result = sandbox.run(code)
    assert result.ok, result.stderr
    assert "ATTACHED" not in result.stdout and "traceme -1 Operation not permitted" in result.stdout
    state = Path(f"/proc/{sibling.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert sibling.poll() is None and state not in ("t", "T")
    assert "TracerPid:\t0" in Path(f"/proc/{sibling.pid}/status").read_text()


def test_syscall_filter_refuses_what_tests_never_need(sandbox):
    import pyseccomp

    arch = pyseccomp.system_arch()
    numbers = {name: pyseccomp.resolve_syscall(arch, name) for name in
               ("mount", "unshare", "setns", "kexec_load", "init_module", "finit_module", "delete_module",
                "bpf", "perf_event_open", "keyctl", "pivot_root")}
    code = ("import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"for name, nr in {numbers!r}.items():\n"
            "    args = (0x10000000, 0, 0, 0, 0) if name == 'unshare' else (0, 0, 0, 0, 0)  # CLONE_NEWUSER\n"
            "    ret = libc.syscall(nr, *args)\n"
            "    print(name, ret, os.strerror(ctypes.get_errno()))\n"
            "for family, kind in ((socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW),\n"
            "                     (socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK)):\n"
            "    try:\n        socket.socket(family, kind, 1)\n        print('raw socket OPENED')\n"
            "    except OSError as exc:\n        print('raw', exc.errno)\n")
    result = sandbox.run(code)
    assert result.ok, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ", 1)[0] in numbers)
    assert lines == {name: "-1 Operation not permitted" for name in numbers}
    assert result.stdout.count("raw 1\n") == 3 and "OPENED" not in result.stdout

