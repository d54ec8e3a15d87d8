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

Documents are concatenated as ``<|begin_of_text|> text <|end_of_text|>``, so the loader can cut
fixed-length windows anywhere. Reads are memory-mapped; a file whose size, magic, version, itemsize or
checksum is wrong raises FormatError naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
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


def iter_documents(path: str | Path) -> Iterator[str]:
    """Documents of a text source: a JSONL file gives one per line ("text" key), any other file is one."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if _looks_like_jsonl(text):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{path}:{lineno}: not JSON ({exc.msg})", path=str(path),
                                  field=f"line {lineno}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise FormatError(f"{path}:{lineno}: a JSONL record needs a string 'text'", path=str(path),
                                  field=f"line {lineno}")
            yield record["text"]
    elif text.strip():
        yield text


def _looks_like_jsonl(text: str) -> bool:
    first = text.lstrip()[:1]
    if first != "{":
        return False
    try:
        json.loads(text.lstrip().split("\n", 1)[0])
    except json.JSONDecodeError:
        return False
    return True


def tokenize_documents(documents: Iterable[str], tokenizer) -> np.ndarray:
    """Concatenate ``bos + ids + eos`` of every document into one uint32 array."""
    parts = [np.asarray(tokenizer.encode(doc, bos=True, eos=True), dtype=np.uint32) for doc in documents]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def expand_sources(sources: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus the files of named directories in sorted order (hidden files skipped)."""
    files: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"data source not found: {source}")
    return files


def prepare_shards(sources: Iterable[str | Path], shard_dir: str | Path, tokenizer=None) -> list[Path]:
    """Shards for every source: a shard is used as is, a text/JSONL file is tokenized once and cached.

    The cache name carries the source's sha256, so an edited source is tokenized again. ``tokenizer``
    defaults to Meta's Llama 3 tokenizer (loaded only if some source needs tokenizing).
    """
    shards = []
    for source in expand_sources(sources):
        if is_shard(source):
            shards.append(source)
            continue
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        target = Path(shard_dir) / f"{source.stem}-{digest}.bin"
        if not target.exists():
            if tokenizer is None:
                from corral.tokenizer import load_llama3_tokenizer

                tokenizer = load_llama3_tokenizer()
            write_shard(target, tokenize_documents(iter_documents(source), tokenizer))
        shards.append(target)
    return shards
