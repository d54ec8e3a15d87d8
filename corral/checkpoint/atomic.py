"""Atomic file replacement: readers see the old file or the whole new one, never a partial write.

A temp file beside the target (same filesystem, so the rename is atomic), fsync, rename, then
fsync the directory so the rename itself survives a crash (RELIABILITY.md 15, 33).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from corral.errors import NoSpaceError

# numpy's tofile (what gguf's writer uses) reports a short write as "N requested and M written", without errno.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``, on error delete it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # Created like any new file (0o666 less the umask; mkstemp would leave 0o600), never over an existing one.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            full = NoSpaceError(f"no space left on the device while writing {path.name}; the partial file was removed")
            full.errno = errno.ENOSPC  # numpy's short write carries none; the server answers ENOSPC with 507
            raise full from exc
        raise
    fsync_directory(path.parent)


def is_disk_full(exc: BaseException) -> bool:
    """A write failed because the file system (or the user's quota) is full."""
    if not isinstance(exc, OSError) or isinstance(exc, NoSpaceError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or bool(_SHORT_WRITE.search(str(exc)))


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)`` and move the result over ``path`` atomically."""
    with atomic_output(path) as tmp:
        write(tmp)


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
