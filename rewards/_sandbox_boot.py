"""Runs inside the sandbox's own interpreter (`python -I -c <this file>`), before the untrusted code.

Read by rewards.sandbox and passed with `-c`; never imported. By mode:

* "bwrap": bubblewrap has built the sandbox and loaded the seccomp filter; this only sets rlimits
  (inside the new user namespace, so the process limit counts this run's processes) and runs the code.
* "namespaces" (bubblewrap missing): unshares mount, PID and network namespaces (plus a user
  namespace when not root); builds a root on a tmpfs out of read-only binds of the host's /usr,
  /etc, ... and the interpreter's directories, a minimal /dev and a size-capped tmpfs work dir, makes
  it all read-only except the work dir (mount_setattr, Linux >= 5.12) and chroots into it; forks PID
  1 of the new namespace (every descendant dies with it), which mounts a fresh /proc, sets rlimits,
  drops to uid 65534 (root) or all capabilities (user namespace), loads the seccomp filter and runs.
* "rlimits": rlimits, the seccomp filter and an audit hook on sockets, in the given work dir.
"""

import marshal
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 1, 22, 38, 2
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2
CAP_VERSION_3 = 0x20080522
DEVICES = ("null", "zero", "full", "random", "urandom")
WORKDIR = "/tmp/work"


def native():
    """ctypes and libc, imported only where needed: every import here is paid by every run's start
    (why the config comes marshalled, not as JSON, and traceback is imported only on an error)."""
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def check(ret, what):
    if ret != 0:
        ctypes, _ = native()
        sys.stderr.write(f"sandbox setup failed: {what}: {os.strerror(ctypes.get_errno())}\n")
        os._exit(125)


def mount(libc, source, target, fstype, flags, options, what):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     options and options.encode()), what)


def set_limits(cfg):
    mb = 1024 * 1024
    for limit, value in ((resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
                         (resource.RLIMIT_FSIZE, cfg["file_mb"] * mb), (resource.RLIMIT_NPROC, cfg["nproc"]),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


def load_filter(cfg):
    """The seccomp BPF that rewards.sandbox compiled with libseccomp; also sets no_new_privs."""
    ctypes, libc = native()

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if cfg["seccomp"]:
        buf = ctypes.create_string_buffer(cfg["seccomp"], len(cfg["seccomp"]))
        prog = SockFprog(len(cfg["seccomp"]) // 8, ctypes.addressof(buf))
        check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp filter")


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
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)


def build_root(libc, cfg, root):
    """A read-only tree at `root` of the allowed host dirs, a minimal /dev and an empty work dir.
    Sources are opened before the staging tmpfs covers `root` (it may hide some of them)."""
    binds = {f"/{n}": f"/{n}" for n in cfg["root_dirs"] if os.path.isdir(f"/{n}") and not os.path.islink(f"/{n}")}
    binds.update({p: p for p in cfg["expose"]})
    binds.update({f"/dev/{d}": f"/dev/{d}" for d in DEVICES})
    held = {dest: os.open(src, os.O_PATH) for dest, src in binds.items()}
    links = {f"/{n}": os.readlink(f"/{n}") for n in cfg["root_dirs"] if os.path.islink(f"/{n}")}
    mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755", "tmpfs root")
    for path in ("/dev", "/proc", WORKDIR):
        os.makedirs(root + path)
    mount(libc, "tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755", "tmpfs /dev")
    links.update({"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
                  "/dev/stderr": "/proc/self/fd/2"})
    for dest, target in links.items():
        os.symlink(target, root + dest)
    for dest, fd in held.items():
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(root + dest, exist_ok=True)
        else:
            open(root + dest, "w").close()
        mount(libc, f"/proc/self/fd/{fd}", root + dest, None, MS_BIND | MS_REC, None, f"bind {dest}")
        os.close(fd)
    ctypes, _ = native()
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)  # struct mount_attr
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, root.encode(), AT_RECURSIVE, attr, ctypes.sizeof(attr)),
          "read-only root (mount_setattr needs Linux >= 5.12)")
    mount(libc, "tmpfs", root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode=0755", "work dir")


def namespaced(source, cfg):
    ctypes, libc = native()
    uid, gid = os.getuid(), os.getgid()
    as_root = uid == 0
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | (0 if as_root else CLONE_NEWUSER)), "unshare")
    if not as_root:  # map only ourselves: the code keeps this uid, with no capabilities once set up
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None, "make mounts private")
    build_root(libc, cfg, "/tmp")
    os.chroot("/tmp")
    os.chdir("/")
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "parent-death signal")
    mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None, "mount /proc")
    if as_root:
        os.chown(WORKDIR, cfg["uid"], cfg["uid"])
    os.chdir(WORKDIR)
    set_limits(cfg)
    if as_root:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    header, data = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0), (ctypes.c_uint32 * 6)()  # all sets empty
    check(libc.capset(header, data), "drop capabilities")
    load_filter(cfg)
    run_code(source, cfg)


def plain(source, cfg):
    os.chdir(cfg["workdir"])
    set_limits(cfg)
    load_filter(cfg)
    sys.addaudithook(block_sockets)
    run_code(source, cfg)


def inside_bwrap(source, cfg):
    set_limits(cfg)
    run_code(source, cfg)


def main():
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    with open(cfg["code_path"]) as fh:
        source = fh.read()
    {"bwrap": inside_bwrap, "namespaces": namespaced, "rlimits": plain}[cfg["mode"]](source, cfg)


main()
