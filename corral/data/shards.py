"""Token shards: one flat array of token ids per file, with a header and a checksum.

Layout (little-endian), version 1::

    offset  size  field
    0       8     magic      b"CRLTOK\\x00\\x01"
    8       4     version    uint32, 1
    12      4     itemsize   uint32, 2 (uint16 ids) or 4 (uint32 ids)
    16      8     n_tokens   uint64
    24      32    sha256     of the payload bytes
    56      8     reserved   zero
    64      ...   payload    n_tokens ids, itemsize bytes each

corral.data.tokenize concatenates documents as ``<|begin_of_text|> text <|end_of_text|>``, so the
loader can cut fixed-length windows anywhere. Reads are memory-mapped; a file whose size, magic, version,
itemsize or checksum is wrong raises FormatError naming the file and the field.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from corral.errors import FormatError

MAGIC = b"CRLTOK\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIQ32s8x")  # 64 bytes
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def write_shard(path: str | Path, tokens: np.ndarray | list[int]) -> Path:
    """Write ids as a shard (uint16 when every id fits, else uint32), atomically: temp file, fsync, rename."""
    path = Path(path)
    array = np.asarray(tokens, dtype=np.int64)
    if array.ndim != 1 or (array.size and (array.min() < 0 or array.max() >= 2**32)):
        raise ValueError("token ids must be a flat array of values in [0, 2**32)")
    dtype = _DTYPES[2] if not array.size or array.max() < 2**16 else _DTYPES[4]
    payload = array.astype(dtype).tobytes()
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, array.size, hashlib.sha256(payload).digest())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def is_shard(path: str | Path) -> bool:
    """True when the file starts with the shard magic (content decides, never the name)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_shard(path: str | Path, *, verify: bool = True) -> np.memmap:
    """Memory-map a shard's ids (n_tokens,); FormatError naming the file if it is truncated or corrupted."""
    path = Path(path)
    where = str(path)
    size = path.stat().st_size
    if size < HEADER.size:
        raise FormatError(f"{path}: {size} bytes is shorter than the {HEADER.size}-byte shard header",
                          path=where, field="header")
    with open(path, "rb") as f:
        magic, version, itemsize, n_tokens, digest = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise FormatError(f"{path}: not a Corral token shard (magic {magic!r})", path=where, field="magic")
    if version != VERSION:
        raise FormatError(f"{path}: shard version {version} is not supported (expected {VERSION})",
                          path=where, field="version")
    if itemsize not in _DTYPES:
        raise FormatError(f"{path}: itemsize {itemsize} must be 2 or 4", path=where, field="itemsize")
    expected = HEADER.size + n_tokens * itemsize
    if size != expected:
        raise FormatError(f"{path}: file is {size} bytes but the header promises {expected} "
                          f"({n_tokens} tokens); truncated or padded", path=where, field="n_tokens")
    if n_tokens == 0:
        return np.zeros(0, dtype=_DTYPES[itemsize])  # np.memmap refuses empty maps
    ids = np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=HEADER.size, shape=(n_tokens,))
    if verify and hashlib.sha256(ids.data).digest() != digest:
        raise FormatError(f"{path}: payload checksum does not match the header; the shard is corrupted",
                          path=where, field="sha256")
    return ids
