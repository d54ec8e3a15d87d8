"""Content-addressed blobs: ``models/blobs/sha256-<hex>``, written only through a verifying stream.

A blob appears under its final name only after every byte was hashed on the way in and the
hash matched the name (RELIABILITY.md 12): bytes go to a temp file beside it, are fsynced, and
the temp file is renamed over the final name (``corral.checkpoint.atomic``). A wrong byte or a
wrong length deletes the temp file and raises.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from corral.checkpoint.atomic import atomic_output
from corral.errors import FormatError
from corral.store.names import blob_file_name, digest_from_file_name

CHUNK = 1 << 20
Progress = Callable[[int], None] | None
"""Called with the number of bytes just read, for progress bars."""


class BlobMismatchError(FormatError):
    """A blob's bytes do not hash to its digest, or its length is not the declared size."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_stream(source: BinaryIO, progress: Progress = None) -> tuple[str, int]:
    """(digest, size) of everything left in `source`."""
    h, size = hashlib.sha256(), 0
    while chunk := source.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if progress:
            progress(len(chunk))
    return "sha256:" + h.hexdigest(), size


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        """The final path of a blob; the digest is validated, so the path is always inside root."""
        return self.root / blob_file_name(digest)

    def has(self, digest: str, size: int | None = None) -> bool:
        path = self.path(digest)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def ingest(self, source: BinaryIO, digest: str, size: int | None = None, progress: Progress = None) -> bool:
        """Copy `source` in as blob `digest`, hashing as it streams; False if the blob was already there.

        With `size` given, reading stops one byte past it, so an endless or oversized source is refused
        without filling the disk.
        """
        final = self.path(digest)
        if self.has(digest, size):
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_output(final) as tmp, open(tmp, "wb") as out:
            h, written = hashlib.sha256(), 0
            limit = None if size is None else size + 1
            while chunk := source.read(CHUNK if limit is None else min(CHUNK, limit - written)):
                h.update(chunk)
                out.write(chunk)
                written += len(chunk)
                if progress:
                    progress(len(chunk))
                if limit is not None and written >= limit:
                    break
            if size is not None and written != size:
                got_size = written if written <= size else "more"
                raise BlobMismatchError(f"blob {digest} should be {size} bytes, got {got_size}")
            got = "sha256:" + h.hexdigest()
            if got != digest:
                raise BlobMismatchError(f"blob content hashes to {got}, not {digest}")
        return True

    def add_bytes(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        self.ingest(io.BytesIO(data), digest, len(data))
        return digest, len(data)

    def add_file(self, path: Path, progress: Progress = None) -> tuple[str, int]:
        """Hash a file, then copy it in (re-hashed while copying, so a file changing underneath is caught)."""
        with open(path, "rb") as f:
            digest, size = hash_stream(f)
        if not self.has(digest, size):
            with open(path, "rb") as f:
                self.ingest(f, digest, size, progress)
        elif progress:
            progress(size)
        return digest, size

    def check(self, digest: str, progress: Progress = None) -> str | None:
        """None if the blob re-hashes to its name, else what is wrong with it."""
        path = self.path(digest)
        if not path.is_file():
            return "missing"
        with open(path, "rb") as f:
            got, _ = hash_stream(f, progress)
        return None if got == digest else f"content hashes to {got}"

    def digests(self) -> list[str]:
        """Every blob present under a valid final name."""
        if not self.root.is_dir():
            return []
        return sorted(d for p in self.root.iterdir() if (d := digest_from_file_name(p.name)) and p.is_file())

    def stray_files(self) -> list[Path]:
        """Files under root that are not blobs: temp files of interrupted writes, or foreign files."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if digest_from_file_name(p.name) is None)

    def remove(self, digest: str) -> int:
        path = self.path(digest)
        size = path.stat().st_size if path.is_file() else 0
        path.unlink(missing_ok=True)
        return size

    def stale_temp_files(self, older_than_s: float = 3600.0) -> list[Path]:
        """Temp files a killed writer left (old enough that no live writer still owns them)."""
        now = time.time()
        return [p for p in self.stray_files()
                if p.name.startswith(".") and p.name.endswith(".tmp") and now - p.stat().st_mtime > older_than_s]

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        stale = self.stale_temp_files(older_than_s)
        for path in stale:
            os.unlink(path)
        return len(stale)
