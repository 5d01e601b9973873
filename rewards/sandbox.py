"""Run untrusted Python (model-written code) in a throwaway, resource-limited process.

Three isolation modes, best first; `Sandbox.isolation` says which one runs (what each contains:
docs/rewards.md, "The sandbox"):

* **"bwrap"** (bubblewrap, when installed and the sandbox user can run this interpreter): a
  minimal root with only /usr, /etc, the /bin-style links and the interpreter's own directories,
  all read-only; a size-capped tmpfs work dir (/tmp/work) as the one writable place; fresh /proc,
  a minimal read-only /dev; new user, mount, PID, network, IPC, UTS and cgroup namespaces. As
  root bwrap itself runs as uid 65534 (nobody), so root-only files stay unreadable; as any other
  user it runs unprivileged through user namespaces.
* **"namespaces"** (our own code in `_sandbox_boot.py`, when bwrap is missing): the same layout
  built with unshare/mount/chroot; as root the code runs as nobody, as another user inside a user
  namespace with no capabilities.
* **"rlimits"** (no namespace can be made): rlimits, a clean environment and an audit hook on
  sockets only. Writes and signals are NOT contained; it warns once, loudly.

Always: a seccomp filter compiled by libseccomp (`syscall_filter`) that refuses ptrace, mount,
unshare/setns, new namespaces, kexec, module loading, raw and packet sockets and more; `python -I`
with an environment of PATH/HOME/LANG only; its own session; rlimits on CPU, address space, file
size and processes; a wall-clock timeout that SIGKILLs the process group (and with it the PID
namespace); stdout/stderr capped at `output_bytes` each.

`Sandbox.run_many` runs programs in parallel: a thread pool drives the subprocesses (each run is
its own process already, so threads only wait on pipes).
"""

from __future__ import annotations

import errno
import logging
import marshal
import math
import os
import selectors
import shutil
import signal
import site
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
WORKDIR = "/tmp/work"
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8",
             "PYTHONDONTWRITEBYTECODE": "1"}
# Top-level host directories the program may see (read-only); everything else is absent.
ROOT_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
Isolation = Literal["bwrap", "namespaces", "rlimits"]
ISOLATIONS: tuple[Isolation, ...] = ("bwrap", "namespaces", "rlimits")
log = logging.getLogger(__name__)

# Syscalls a test program never needs; refused with EPERM (clone3 with ENOSYS, so libc falls back
# to clone, whose namespace flags the filter can see). Names this architecture lacks are skipped.
REFUSED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "unshare", "setns", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at", "swapon",
    "swapoff", "reboot", "syslog", "acct", "quotactl", "iopl", "ioperm", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "lookup_dcookie", "vhangup", "uselib",
)
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
AF_PACKET, SOCK_RAW, SOCK_TYPE_MASK, TIOCSTI = 17, 3, 0xF, 0x5412


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
    """Runs Python sources under `limits`; `isolation` is "bwrap", "namespaces" or "rlimits"."""

    def __init__(self, limits: SandboxLimits | None = None, workers: int | None = None,
                 isolation: Literal["auto"] | Isolation = "auto"):
        self.limits = limits or SandboxLimits()
        self.workers = workers or os.cpu_count() or 1
        if isolation not in ("auto", *ISOLATIONS):
            raise ValueError(f"Sandbox isolation {isolation!r}: use 'auto' or one of {', '.join(ISOLATIONS)}")
        self.isolation: Isolation = best_isolation() if isolation == "auto" else isolation
        if self.isolation == "rlimits":
            _warn_uncontained()

    def run(self, source: str) -> SandboxResult:
        """Run one program and wait for it (at most `limits.wall_s`)."""
        if self.isolation == "bwrap":
            return self._run_bwrap(source)
        with tempfile.TemporaryDirectory(prefix="align-sandbox-") as tmp:
            code_path = Path(tmp, "main.py")
            code_path.write_text(source)
            workdir = Path(tmp, "work")
            workdir.mkdir()
            config = {**self._config(str(code_path)), "workdir": str(workdir), "uid": NOBODY,
                      "seccomp": syscall_filter() or b""}
            return _spawn([sys.executable, "-I", "-c", BOOT, marshal.dumps(config).hex()], self.limits)

    def run_many(self, sources: Sequence[str]) -> list[SandboxResult]:
        """Run programs in parallel, `workers` at a time; results in input order."""
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, sources))

    def _config(self, code_path: str) -> dict:
        limits = self.limits
        cpu_s = limits.cpu_s or math.ceil(limits.wall_s) + 1
        # Marshalled for the boot, which reads it with no import (json would cost every run `re`'s import).
        return {**asdict(limits), "cpu_s": cpu_s, "code_path": code_path, "mode": self.isolation,
                "env": CLEAN_ENV, "root_dirs": ROOT_DIRS, "expose": exposed_dirs()}

    def _run_bwrap(self, source: str) -> SandboxResult:
        """bwrap gets the program and the seccomp filter as memfds; it copies the program in."""
        code_fd = _memfd("program", source.encode())
        filter_bpf = syscall_filter()
        filter_fd = _memfd("seccomp", filter_bpf) if filter_bpf else None
        try:
            command = bwrap_command(self.limits, code_fd, filter_fd, self._config("/tmp/main.py"))
            fds = (code_fd,) if filter_fd is None else (code_fd, filter_fd)
            return _spawn(command, self.limits, pass_fds=fds, as_nobody=os.geteuid() == 0)
        finally:
            os.close(code_fd)
            if filter_fd is not None:
                os.close(filter_fd)


def bwrap_command(limits: SandboxLimits, code_fd: int, filter_fd: int | None, config: dict) -> list[str]:
    """The bubblewrap command line: a read-only minimal root, one writable tmpfs, the boot inside."""
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--unshare-user", "--disable-userns",
            "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox"]
    for name in ROOT_DIRS:
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in exposed_dirs():
        args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--dir", "/tmp",
             "--file", str(code_fd), "/tmp/main.py",
             "--size", str(limits.tmpfs_mb * 1024 * 1024), "--tmpfs", WORKDIR, "--chdir", WORKDIR,
             "--remount-ro", "/"]
    if filter_fd is not None:
        args += ["--seccomp", str(filter_fd)]
    return [*args, "--", sys.executable, "-I", "-c", BOOT, marshal.dumps(config).hex()]


@cache
def exposed_dirs() -> list[str]:
    """The interpreter's own directories that lie outside ROOT_DIRS (a venv, /opt or pyenv prefix),
    outermost only."""
    dirs = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, *site.getsitepackages())
                   if os.path.isdir(p)})
    outer: list[str] = []
    for path in dirs:
        if path.split("/")[1] in ROOT_DIRS or any(path.startswith(o + "/") for o in outer):
            continue
        outer.append(path)
    return outer


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _spawn(command: list[str], limits: SandboxLimits, pass_fds: Sequence[int] = (),
           as_nobody: bool = False) -> SandboxResult:
    """Start the command in its own session; collect capped output until exit or timeout."""
    start = time.monotonic()
    user = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_nobody else {}
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=CLEAN_ENV, cwd="/", start_new_session=True, close_fds=True, pass_fds=pass_fds,
                            **user)
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
def syscall_filter() -> bytes | None:
    """The seccomp BPF program (native architecture; other ABIs are killed), compiled by
    libseccomp through pyseccomp; None where libseccomp is missing (then a warning says so)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # OSError: pyseccomp found no libseccomp.so
        log.warning("sandbox: no seccomp filter (%s); install libseccomp2 and pyseccomp", exc)
        return None
    refuse = sc.ERRNO(errno.EPERM)
    rules = sc.SyscallFilter(sc.ALLOW)
    for name in REFUSED_SYSCALLS:
        try:
            rules.add_rule(refuse, name)
        except (OSError, ValueError, RuntimeError):  # not a syscall on this architecture
            continue
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NEW_FLAGS:
        rules.add_rule(refuse, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    rules.add_rule(refuse, "socket", sc.Arg(0, sc.EQ, AF_PACKET))
    rules.add_rule(refuse, "socket", sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, SOCK_RAW))
    rules.add_rule(refuse, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))
    with tempfile.TemporaryFile() as fh:
        rules.export_bpf(fh)
        fh.seek(0)
        return fh.read()


def _probe(isolation: Isolation) -> bool:
    probe = Sandbox(SandboxLimits(wall_s=20), workers=1, isolation=isolation).run("print('ok')")
    if not probe.ok:
        log.debug("sandbox: %s unavailable: %s", isolation, probe.stderr.strip()[-500:])
    return probe.ok and probe.stdout.strip() == "ok"


@cache
def available_isolations() -> tuple[Isolation, ...]:
    """The modes that work here, best first (probed once each by running a program)."""
    if sys.platform != "linux":
        return ("rlimits",)
    bwrap = ("bwrap",) if shutil.which("bwrap") and _probe("bwrap") else ()
    return (*bwrap, *(("namespaces",) if _probe("namespaces") else ()), "rlimits")


def best_isolation() -> Isolation:
    return available_isolations()[0]


_warned = False


def _warn_uncontained() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("SANDBOX NOT CONTAINED: no namespace could be made here, so sandboxed programs run as "
                    "this user with rlimits only; their writes anywhere this user may write and their "
                    "signals to this user's processes are NOT prevented. Install bubblewrap or allow "
                    "unprivileged user namespaces (docs/rewards.md, 'The sandbox').")
