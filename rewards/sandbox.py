"""Run untrusted Python (model-written code) in a throwaway, resource-limited process.

What is enforced, and how (details and caveats in docs/rewards.md):

* **Isolation (root, Linux namespaces; used when available):** private mount, network and PID
  namespaces; the code runs as PID 1 of its own PID namespace, as uid 65534 (nobody), with no
  supplementary groups, in a fresh tmpfs at /tmp/work. /tmp, /var/tmp, /dev/shm and /run/lock
  are private tmpfs mounts, so nothing it writes outlives it; the rest of the filesystem is
  writable only where `nobody` could write anyway. No network interface is up. It cannot see or
  signal host processes (fresh /proc, other uid).
* **Always:** `python -I` (no env vars, no user site), an empty environment apart from PATH/HOME/
  LANG (no parent secrets), its own session/process group, rlimits on CPU time, address space, file
  size and process count, a wall-clock timeout that SIGKILLs the process group (and with it the
  whole PID namespace), and stdout/stderr capped at `output_bytes` each.
* **Fallback (not root, or namespaces refused):** the same rlimits/env/timeout plus an audit hook
  that refuses socket connect/bind; writes outside the work dir and signals to the parent are
  *not* prevented there. `Sandbox.isolation` says which mode is in use.

`Sandbox.run_many` runs programs in parallel: a thread pool drives the subprocesses (each run is
its own process already, so threads only wait on pipes).
"""

from __future__ import annotations

import json
import math
import os
import selectors
import site
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Literal

BOOT = (Path(__file__).with_name("_sandbox_boot.py")).read_text()
NOBODY = 65534
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/work", "LANG": "C.UTF-8",
             "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `cpu_s` defaults to the wall timeout rounded up, plus one second."""

    wall_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    file_mb: int = 16
    tmpfs_mb: int = 64
    nproc: int = 64
    output_bytes: int = 64 * 1024


@dataclass
class SandboxResult:
    """How a run ended; `ok` is a clean exit (status 0, no timeout)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class Sandbox:
    """Runs Python sources under `limits`; `isolation` is "namespaces" or "rlimits" (the fallback)."""

    def __init__(self, limits: SandboxLimits | None = None, workers: int | None = None,
                 isolation: Literal["auto", "namespaces", "rlimits"] = "auto"):
        self.limits = limits or SandboxLimits()
        self.workers = workers or os.cpu_count() or 1
        self.isolation = ("namespaces" if namespaces_available() else "rlimits") if isolation == "auto" else isolation

    def run(self, source: str) -> SandboxResult:
        """Run one program and wait for it (at most `limits.wall_s`)."""
        with tempfile.TemporaryDirectory(prefix="align-sandbox-") as tmp:
            code_path = Path(tmp, "main.py")
            code_path.write_text(source)
            workdir = Path(tmp, "work")
            workdir.mkdir()
            return _spawn(self._config(code_path, workdir), self.limits)

    def run_many(self, sources: Sequence[str]) -> list[SandboxResult]:
        """Run programs in parallel, `workers` at a time; results in input order."""
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, sources))

    def _config(self, code_path: Path, workdir: Path) -> dict:
        limits = self.limits
        cpu_s = limits.cpu_s or math.ceil(limits.wall_s) + 1
        return {**asdict(limits), "cpu_s": cpu_s, "code_path": str(code_path), "workdir": str(workdir),
                "namespaces": self.isolation == "namespaces", "uid": NOBODY, "env": CLEAN_ENV,
                "expose": sorted({sys.base_prefix, sys.prefix, *site.getsitepackages()})}


def _spawn(config: dict, limits: SandboxLimits) -> SandboxResult:
    """Start the boot interpreter in its own session; collect capped output until exit or timeout."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", "-c", BOOT, json.dumps(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLEAN_ENV, cwd="/",
                            start_new_session=True, close_fds=True)
    out, timed_out = _collect(proc, start + limits.wall_s, limits.output_bytes)
    if timed_out:
        _kill_group(proc)
    returncode = proc.wait()
    return SandboxResult(None if timed_out else returncode, out[proc.stdout.fileno()].decode(errors="replace"),
                         out[proc.stderr.fileno()].decode(errors="replace"), timed_out, time.monotonic() - start)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[dict[int, bytes], bool]:
    """Read both pipes until EOF, keeping the first `cap` bytes of each; True when the deadline hit."""
    chunks = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    with selectors.DefaultSelector() as sel:
        for pipe in (proc.stdout, proc.stderr):
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {fd: bytes(b) for fd, b in chunks.items()}, True
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                buf = chunks[key.fd]
                buf += data[: max(0, cap - len(buf))]  # keep draining past the cap so the child never blocks
    return {fd: bytes(b) for fd, b in chunks.items()}, False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@cache
def namespaces_available() -> bool:
    """Whether this process may create the namespaces (root on Linux, not blocked by seccomp)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    probe = Sandbox(SandboxLimits(wall_s=20), workers=1, isolation="namespaces").run("print('ok')")
    return probe.ok and probe.stdout.strip() == "ok"
