"""The sandbox's launcher: run as a script by corral.eval.sandbox, never imported.

It starts as the caller (root or not) in a fresh interpreter with no threads, closes the doors
the program could leave through, drops to a uid of its own, then runs the program in-process:

1. kernel isolation, best available (`mode`):
   - "root": new mount and network namespaces (an empty network: not even loopback is up);
     the work folder is bind-mounted over /tmp; /var/tmp, /dev/shm and /run/lock get empty
     tmpfs; the caller's home is hidden under an empty read-only tmpfs (the Python install is
     bound back read-only when it lives there); then setuid/setgid to a uid no one else runs as,
     so the rest of the file system is only as writable as it is for "others", and signals
     reach no other process;
   - "userns": an unprivileged user + network namespace: no network; files and processes
     stay reachable with the caller's own rights;
   - "none": neither is available.
2. resource limits (setrlimit): CPU seconds, address space, file size, process count (per uid,
   so only real under "root"), open files, no core files.
3. a Python audit hook (PEP 578): no sockets, no fork/subprocess/exec/spawn, no ctypes, no writes,
   deletes or renames outside the work folder. Python code can be clever; the hook is a layer
   for "userns"/"none", not a wall. The kernel layers above are the walls.

argv[1] is a JSON object: workdir, mode, uid, limits, hide (home folders to cover).
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
LIBC = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    args = [s.encode() if s is not None else None for s in (source, target, fstype)]
    _check(LIBC.mount(*args, flags, data.encode() if data else None), f"mount {target}")


def isolate_root(workdir: str, hide: list[str]) -> str:
    """Namespaces and mounts (needs CAP_SYS_ADMIN); returns the work folder's path as the program sees it."""
    _check(LIBC.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here leaks back to the host
    keep = [os.path.realpath(p) for p in {sys.base_prefix, sys.prefix}]
    for home in hide:
        if not os.path.isdir(home) or home in ("/", os.path.dirname(workdir)) or workdir.startswith(home + "/"):
            continue
        fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in keep if p.startswith(home + "/")]
        _mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for path, fd in fds:  # the interpreter's own files, read-only, at their own path
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
            os.close(fd)
        _mount(None, home, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for shared in ("/var/tmp", "/dev/shm", "/run/lock"):  # the other folders anyone may write
        if os.path.isdir(shared):
            _mount("tmpfs", shared, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
    _mount(workdir, "/tmp", None, MS_BIND)
    return "/tmp"


def isolate_userns() -> None:
    _check(LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare")


def set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


BLOCKED_EVENTS = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
                  "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn",
                  "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "os.kill", "os.killpg", "os.setuid",
                  "os.fork", "os.forkpty"}  # RLIMIT_NPROC binds only under "root": elsewhere, no fork at all
PATH_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.rename": 1, "os.mkdir": 0, "os.chmod": 0, "os.chown": 0,
               "os.truncate": 0, "os.symlink": 1, "os.link": 1, "shutil.rmtree": 0, "os.utime": 0}


def install_audit_hook(root: str) -> None:
    """Refuse, from Python, what a test program never needs (PEP 578 audit events)."""
    root = os.path.realpath(root)

    def inside(path) -> bool:
        if isinstance(path, int):  # a file descriptor: already open, so already checked
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None:
            mode, flags = args[1] or "r", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the work folder")
        index = PATH_EVENTS.get(event)
        if index is not None and args and not inside(args[index]):
            raise PermissionError(f"sandbox: {event} {args[index]!r} outside the work folder")

    sys.addaudithook(hook)


def main() -> None:
    config = json.loads(sys.argv[1])
    workdir = config["workdir"]
    if config["mode"] == "root":
        workdir = isolate_root(workdir, config["hide"])
    elif config["mode"] == "userns":
        isolate_userns()
    set_limits(config["limits"])
    if config["uid"] is not None:  # last: after it nothing above can be undone
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
    home = os.path.join(workdir, "home")
    os.chdir(workdir)
    os.environ.update(HOME=home, TMPDIR=workdir, PWD=workdir)
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    if config["audit"]:
        install_audit_hook(workdir)
    sys.argv = ["program.py"]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
