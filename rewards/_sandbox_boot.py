"""Runs inside the sandbox's own interpreter (`python -I -c <this file>`), before the untrusted code.

Read by rewards.sandbox and passed with `-c`; never imported. As root with namespaces it:
unshares mount, network and PID namespaces; mounts private tmpfs over every world-writable
directory and makes the interpreter readable by the sandbox uid; forks PID 1 of the new namespace (so every descendant dies with it), which mounts a fresh
/proc, sets rlimits, drops to the unprivileged uid and runs the code. Without namespaces it sets
rlimits, blocks sockets with an audit hook and runs the code in the work directory it is given.
"""

import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"sandbox setup failed: {what}: {os.strerror(err)}\n")
        os._exit(125)


def set_limits(cfg):
    mb = 1024 * 1024
    for limit, value in ((resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
                         (resource.RLIMIT_FSIZE, cfg["file_mb"] * mb), (resource.RLIMIT_NPROC, cfg["nproc"]),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


def block_sockets(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
        raise PermissionError("network access is disabled in the sandbox")


def run_code(source, cfg):
    os.environ.clear()
    os.environ.update(cfg["env"])
    sys.argv = ["<sandbox>"]
    try:
        exec(compile(source, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as exc:  # report as plain `python` would, without this boot script's frames
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)


def blocked_ancestor(path):
    """The highest directory on `path` that others may not traverse (e.g. /root, mode 0700), or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def expose(libc, paths):
    """Make the interpreter's own directories readable to the sandbox uid when they sit under a
    private directory: a tmpfs hides the private directory, and each needed path is bind-mounted
    back into it read-only (sources are held open first, since the tmpfs then covers them)."""
    needed = [(p, blocked_ancestor(p)) for p in paths if os.path.isdir(p)]
    needed = [(p, a) for p, a in needed if a is not None]
    held = {p: os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p, _ in needed}
    for ancestor in sorted({a for _, a in needed}):
        check(libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755"),
              f"tmpfs on {ancestor}")
    for path, fd in held.items():
        os.makedirs(path, exist_ok=True)
        check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
        check(libc.mount(None, path.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), f"read-only {path}")
        os.close(fd)


def namespaced(source, cfg):
    libc = ctypes.CDLL(None, use_errno=True)
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    expose(libc, cfg["expose"])
    options = f"size={cfg['tmpfs_mb']}m,mode=1777".encode()
    for path in WRITABLE_DIRS:
        if os.path.isdir(path):
            check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), f"tmpfs on {path}")
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "parent-death signal")
    check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")
    os.mkdir("/tmp/work")
    os.chown("/tmp/work", cfg["uid"], cfg["uid"])
    os.chdir("/tmp/work")
    set_limits(cfg)
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    run_code(source, cfg)


def plain(source, cfg):
    os.chdir(cfg["workdir"])
    set_limits(cfg)
    sys.addaudithook(block_sockets)
    run_code(source, cfg)


def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["code_path"]) as fh:
        source = fh.read()
    (namespaced if cfg["namespaces"] else plain)(source, cfg)


main()
