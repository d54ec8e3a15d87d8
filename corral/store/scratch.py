"""Scratch folders of long store commands: ``models/.quantize-*`` (quantize, over the CLI or HTTP) and
``models/.create-*`` (an HTTP create naming uploaded files).

Each folder holds an ``.owner`` file: the pid, its start time (``/proc/<pid>/stat`` field 22, so a pid the
kernel reused later is not mistaken for the owner) and the host. A folder whose owner is gone was left by a
killed command: garbage collection removes it (every new scratch folder and every `corral rm` collects)
and `corral verify` lists it (RELIABILITY.md 45). A folder without an owner file (an older Corral, or a
kill between mkdir and the write) is stale after an hour; one owned on another host after a day.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PREFIXES = (".quantize-", ".create-")
OWNER = ".owner"  # hidden: an uploaded file (a plain name, no leading dot) never meets it
UNOWNED_STALE_S = 3600.0
FOREIGN_STALE_S = 86400.0


def _start_time(pid: int) -> str | None:
    """Clock ticks after boot at which `pid` started; None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in (...) may hold spaces
    return fields[19] if len(fields) > 19 else None


def _owner_alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's process
    started = owner.get("started")
    return started is None or _start_time(pid) in (None, started)


def _age(path: Path) -> float:
    return time.time() - path.stat().st_mtime


def _is_stale(path: Path) -> bool:
    try:
        owner = json.loads((path / OWNER).read_text())
    except (OSError, ValueError):
        owner = None
    if not isinstance(owner, dict):
        return _age(path) > UNOWNED_STALE_S
    if owner.get("host") != socket.gethostname():
        return _age(path) > FOREIGN_STALE_S  # its pid means nothing here
    return not _owner_alive(owner)


def stale_scratch(models: Path) -> list[Path]:
    """Scratch folders under `models` that no live process owns."""
    if not models.is_dir():
        return []
    found = []
    for path in sorted(models.iterdir()):
        if path.name.startswith(PREFIXES) and path.is_dir() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # its owner finished while we looked
                if _is_stale(path):
                    found.append(path)
    return found


def tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def collect_scratch(models: Path) -> int:
    """Remove stale scratch folders; the bytes freed."""
    freed = 0
    for path in stale_scratch(models):
        freed += tree_size(path)
        shutil.rmtree(path, ignore_errors=True)
    return freed


@contextlib.contextmanager
def scratch_dir(models: Path, kind: str) -> Iterator[Path]:
    """A fresh ``models/.<kind>-*`` folder owned by this process, removed on exit; stale ones go first."""
    assert f".{kind}-" in PREFIXES, kind
    models.mkdir(parents=True, exist_ok=True)
    collect_scratch(models)
    path = Path(tempfile.mkdtemp(dir=models, prefix=f".{kind}-"))
    try:
        owner = {"pid": os.getpid(), "started": _start_time(os.getpid()), "host": socket.gethostname()}
        (path / OWNER).write_text(json.dumps(owner))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
