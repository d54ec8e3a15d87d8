"""Run untrusted Python (model-written code and its tests) in a contained subprocess.

`run_python(source)` writes the program into a fresh temporary folder and runs it through
`sandbox_child.py`, which isolates it (see that file for the layers) and then executes it.
What is guaranteed depends on what the machine allows (`isolation()`):

- "root" (Corral runs as root, or with CAP_SYS_ADMIN): no network at all (an empty network
  namespace); the program runs as a uid of its own, so it can write only its work folder (seen
  as /tmp, with HOME inside it) and files that are writable by everyone, which we cover with
  fresh tmpfs for /var/tmp, /dev/shm and /run/lock; the caller's home is hidden; it can signal
  no other process; RLIMIT_NPROC bounds its processes.
- "userns" (unprivileged user namespaces): no network; but files and processes of the calling
  user are reachable with that user's rights, stopped only by the Python audit hook.
- "none": resource limits and the audit hook only.
The audit hook (on by default) also refuses fork, exec, subprocesses, sockets and ctypes outright,
since RLIMIT_NPROC binds nobody running as root.

In every mode: CPU-seconds, address-space, file-size, process-count and open-file limits; a
clean environment (HOME inside the work folder); a wall-clock timeout that kills the whole
process group (and, in "root" mode, every process of the sandbox's uid); the folder is removed
afterwards. Anything but a clean exit 0 within the limits scores as a failure.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
PROBE_LIMIT_S = 20.0


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 3.0
    """Wall-clock seconds (the HumanEval reference harness uses 3)."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space of each process."""
    file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file it may write (stdout and stderr included)."""
    processes: int = 16
    """RLIMIT_NPROC: processes of the sandbox's uid (a real bound in "root" mode only)."""
    audit: bool = True
    """Install the Python audit hook as well (tests turn it off to check the kernel layers alone)."""

    def rlimits(self) -> dict:
        cpu = math.ceil(self.timeout_s) + 1  # CPU time <= wall time for one process; the +1 lets the wall clock win
        return {"cpu_seconds": cpu, "memory_bytes": self.memory_bytes, "file_bytes": self.file_bytes,
                "processes": self.processes}


DEFAULT_LIMITS = SandboxLimits()


@dataclass
class SandboxResult:
    status: str
    """"passed" (exit 0), "failed" (non-zero exit or killed by a limit's signal) or "timeout"."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(source: str, limits: SandboxLimits = DEFAULT_LIMITS, *, mode: str | None = None) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; nothing it does outlives the call."""
    mode = mode or isolation()
    uid = (1 << 20) + secrets.randbelow(1 << 30) if mode == "root" else None
    workdir = tempfile.mkdtemp(prefix="corral-sandbox-")
    try:
        _prepare(Path(workdir), source, uid)
        return _launch(workdir, mode, uid, limits)
    finally:
        if uid is not None:
            _kill_uid(uid)
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(sources: list[str], limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 2) -> list[SandboxResult]:
    """Programs run `workers` at a time; results in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_python(s, limits), sources))


def _prepare(workdir: Path, source: str, uid: int | None) -> None:
    (workdir / "home").mkdir()
    (workdir / "program.py").write_text(source, encoding="utf-8")
    if uid is not None:  # the folder becomes the sandbox uid's own, and nobody else's
        for path in (workdir, workdir / "home", workdir / "program.py"):
            os.chown(path, uid, uid)
        os.chmod(workdir, 0o700)


def _launch(workdir: str, mode: str, uid: int | None, limits: SandboxLimits) -> SandboxResult:
    config = {"workdir": workdir, "mode": mode, "uid": uid, "limits": limits.rlimits(), "audit": limits.audit,
              "hide": sorted(_homes())}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": os.path.join(workdir, "home")}
    # -I: ignore PYTHON* variables and user site; -S: no site-packages, the standard library only.
    argv = [sys.executable, "-I", "-S", str(CHILD), json.dumps(config)]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=workdir,
                                start_new_session=True, close_fds=True)
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)
        seconds = time.perf_counter() - started
        stdout, stderr = _tail(out), _tail(err)
    if timed_out:
        return SandboxResult("timeout", None, stdout, stderr, seconds)
    status = "passed" if proc.returncode == 0 else "failed"
    return SandboxResult(status, proc.returncode, stdout, stderr, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group (its children included), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_uid(uid: int) -> None:
    """kill(-1) as the sandbox uid: every process it started, even those that left the group (setsid)."""
    code = (f"import os, signal\nos.setgid({uid}); os.setuid({uid})\n"
            "try: os.kill(-1, signal.SIGKILL)\nexcept OSError: pass")
    subprocess.run([sys.executable, "-I", "-S", "-c", code], env={}, timeout=30, check=False)


def _tail(f, limit: int = 8192) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - limit))
    return f.read().decode("utf-8", "replace")


def _homes() -> set[str]:
    homes = {os.path.expanduser("~"), os.environ.get("HOME", "")}
    try:
        homes.add(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        pass
    return {os.path.realpath(h) for h in homes if h and os.path.isdir(h)}


@functools.cache
def isolation() -> str:
    """The strongest mode this machine allows: "root", "userns" or "none" (probed once per process)."""
    candidates = (["root"] if os.geteuid() == 0 else []) + ["userns"]
    for mode in candidates:
        if run_python("import sys; sys.exit(0)", SandboxLimits(timeout_s=PROBE_LIMIT_S), mode=mode).passed:
            return mode
    return "none"


def describe(mode: str | None = None) -> str:
    """One line for reports: what the sandbox can promise here."""
    mode = mode or isolation()
    return {"root": "network namespace, own uid, private /tmp, resource limits, audit hook",
            "userns": "network namespace, resource limits, audit hook (files reachable with the caller's rights)",
            "none": "resource limits and audit hook only (no kernel isolation available)"}[mode]


__all__ = ["DEFAULT_LIMITS", "SandboxLimits", "SandboxResult", "describe", "isolation", "run_many", "run_python"]
