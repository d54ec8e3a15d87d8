"""A validating parser for GGUF files (llama.cpp's single-file format).

The parser is ours, not ``gguf.GGUFReader``: that reader trusts the counts and lengths in
the file and meets hostile input with whatever numpy raises (an IndexError for a 24-byte
file claiming 2^64-1 tensors). Here (RELIABILITY.md 1-5) every count is bounded by the
bytes that remain before anything is allocated, every tensor's bytes are checked to lie inside the file, and every
problem is a ``FormatError`` naming the field. The file is memory-mapped, so reading the
header of a multi-GB model touches only its first pages.

Layout (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor_count,
u64 kv_count, the key/values, the tensor infos (name, u32 n_dims, u64 ne[n_dims], u32 ggml
type, u64 offset), padding to ``general.alignment``, then the tensor data.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from corral.checkpoint.gguf_dequant import dequantize
from corral.errors import FormatError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8  # arrays of arrays deeper than this are refused instead of recursing without end
_INT64_MAX = 2**63 - 1


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: the numpy dtype of one element (also used for whole arrays at once).
_NUMPY_TYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}
_STRUCTS = {
    ValueType.UINT8: struct.Struct("<B"), ValueType.INT8: struct.Struct("<b"), ValueType.UINT16: struct.Struct("<H"),
    ValueType.INT16: struct.Struct("<h"), ValueType.UINT32: struct.Struct("<I"), ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"), ValueType.BOOL: struct.Struct("<B"), ValueType.UINT64: struct.Struct("<Q"),
    ValueType.INT64: struct.Struct("<q"), ValueType.FLOAT64: struct.Struct("<d"),
}
# The fewest bytes one element of each type can take: bounds an array's count by the bytes left.
_MIN_SIZE = {**{vt: st.size for vt, st in _STRUCTS.items()}, ValueType.STRING: 8, ValueType.ARRAY: 12}
_U32, _U64 = _STRUCTS[ValueType.UINT32], _STRUCTS[ValueType.UINT64]
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# Value kinds that known keys must have ("wrong value types" in RELIABILITY.md 5). Keys under the
# architecture's prefix ("llama.") are listed by suffix.
_INT, _NUM = frozenset({"int"}), frozenset({"int", "float"})
KNOWN_KEY_KINDS: dict[str, frozenset[str]] = {
    "general.alignment": _INT, "general.architecture": frozenset({"str"}), "general.name": frozenset({"str"}),
    "general.file_type": _INT, "general.quantization_version": _INT,
    "tokenizer.ggml.model": frozenset({"str"}), "tokenizer.ggml.pre": frozenset({"str"}),
    "tokenizer.ggml.tokens": frozenset({"list[str]"}), "tokenizer.ggml.merges": frozenset({"list[str]"}),
    "tokenizer.ggml.token_type": frozenset({"list[int]"}), "tokenizer.ggml.scores": frozenset({"list[float]"}),
    "tokenizer.ggml.bos_token_id": _INT, "tokenizer.ggml.eos_token_id": _INT, "tokenizer.ggml.eot_token_id": _INT,
    "tokenizer.ggml.eom_token_id": _INT, "tokenizer.ggml.unknown_token_id": _INT,
    "tokenizer.ggml.padding_token_id": _INT, "tokenizer.ggml.add_bos_token": frozenset({"bool"}),
    "tokenizer.ggml.add_eos_token": frozenset({"bool"}), "tokenizer.chat_template": frozenset({"str"}),
}
KNOWN_ARCH_KEY_KINDS: dict[str, frozenset[str]] = {
    "block_count": _INT, "context_length": _INT, "embedding_length": _INT, "feed_forward_length": _INT,
    "vocab_size": _INT, "attention.head_count": _INT, "attention.head_count_kv": _INT,
    "attention.key_length": _INT, "attention.value_length": _INT, "rope.dimension_count": _INT,
    "rope.freq_base": _NUM, "attention.layer_norm_rms_epsilon": _NUM, "rope.scaling.factor": _NUM,
    "rope.scaling.type": frozenset({"str"}),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """torch order: GGUF's ne reversed, so a (out, in) weight has ne = [in, out]."""
    ggml_type: int
    offset: int
    """Absolute byte offset of the tensor's data in the file."""
    nbytes: int

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    """Plain Python values: str, int, float, bool and (nested) lists of them."""
    value_types: dict[str, tuple[ValueType, ValueType | None]]
    """Per key: its GGUF value type and, for arrays, the element type (so an export can keep them)."""
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    _buf: mmap.mmap = field(repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view into the mapped file (no copy)."""
        view = self._view(name)
        view.flags.writeable = False
        return view

    def raw_tensor(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 torch view of the mapping (no copy, no read until used).

        The mapping is private (copy-on-write), so the view is writable without reaching the file; the
        mapping lives until the last view is gone, even after ``close``."""
        return torch.from_numpy(self._view(name))

    def copied_tensor(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 copy, its pages then dropped from this process's resident set
        (the mapping stays; they come back from the page cache only if read again). For weights a caller
        repacks anyway: without the drop, the mapped pages would count a second time while any view of the
        file lives."""
        info = self.tensors[name]
        out = torch.from_numpy(self._view(name).copy())
        page = mmap.PAGESIZE
        start, end = -(-info.offset // page) * page, (info.offset + info.nbytes) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._buf.madvise(mmap.MADV_DONTNEED, start, end - start)
        return out

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to `dtype`, shaped in torch order; always a fresh copy, never a view of the file."""
        info = self.tensors[name]
        flat = dequantize(torch.from_numpy(self._view(name)), info.ggml_type, info.numel, dtype, name)
        return flat.view(info.shape)

    def close(self) -> None:
        try:
            self._buf.close()
        except BufferError:
            pass  # a raw() view is still alive; the mapping goes when the last view does

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _view(self, name: str) -> np.ndarray:
        # np.frombuffer holds an export of the mmap, so it cannot be closed under a live view.
        info = self.tensors[name]
        return np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


class _Cursor:
    """Reads little-endian fields from the mapped file; every read checks that its bytes exist first."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    @property
    def left(self) -> int:
        return self.size - self.pos

    def error(self, message: str, field: str) -> FormatError:
        return FormatError(message, path=self.path, field=field)

    def take(self, n: int, field: str) -> int:
        if n > self.left:
            raise self.error(f"needs {n} bytes at offset {self.pos}, but only {self.left} remain in the file", field)
        start = self.pos
        self.pos += n
        return start

    def scalar(self, st: struct.Struct, field: str) -> Any:
        return st.unpack_from(self.buf, self.take(st.size, field))[0]

    def string(self, field: str) -> str:
        n = self.scalar(_U64, field)
        start = self.take(n, field)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise self.error("string is not valid UTF-8", field) from None

    def value_type(self, field: str) -> ValueType:
        raw = self.scalar(_U32, field)
        try:
            return ValueType(raw)
        except ValueError:
            raise self.error(f"unknown value type {raw}", field) from None


def _read_value(cur: _Cursor, vtype: ValueType, key: str, depth: int = 0) -> tuple[Any, ValueType | None]:
    """One value of type `vtype`; returns it and, for arrays, the element type."""
    if vtype == ValueType.STRING:
        return cur.string(key), None
    if vtype != ValueType.ARRAY:
        value = cur.scalar(_STRUCTS[vtype], key)
        if vtype == ValueType.BOOL:
            if value > 1:
                raise cur.error(f"bool value must be 0 or 1, got {value}", key)
            value = bool(value)
        elif vtype == ValueType.FLOAT32:
            value = float(str(np.float32(value)))  # the shortest decimal that is this float32: 1e-05, not 9.99e-06
        return value, None
    if depth >= MAX_ARRAY_NESTING:
        raise cur.error(f"arrays nested more than {MAX_ARRAY_NESTING} deep", key)
    etype = cur.value_type(key)
    count = cur.scalar(_U64, key)
    if count * _MIN_SIZE[etype] > cur.left:
        raise cur.error(f"array of {count} {etype.name} values runs past the end of the file", key)
    if etype in _NUMPY_TYPES:
        start = cur.take(count * _MIN_SIZE[etype], key)
        # A copy: a view would pin the mmap, and an error raised while it lives (its frame in the traceback)
        # would make closing the file fail with BufferError instead of reporting the FormatError.
        values = np.frombuffer(cur.buf, dtype=_NUMPY_TYPES[etype], count=count, offset=start).copy()
        if etype == ValueType.BOOL:
            if count and values.max() > 1:
                raise cur.error("bool array holds a value other than 0 or 1", key)
            values = values.astype(bool)
        return values.tolist(), etype
    if etype == ValueType.STRING:
        return _read_strings(cur, count, key), etype
    return [_read_value(cur, etype, key, depth + 1)[0] for _ in range(count)], etype


def _read_strings(cur: _Cursor, count: int, key: str) -> list[str]:
    """`count` strings; the same checks as ``_Cursor.string``, inlined because vocabularies hold 10^5 of them."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, _U64.unpack_from
    out: list[str] = []
    for i in range(count):
        if pos + 8 > size:
            raise cur.error(f"string {i} length runs past the end of the file", key)
        end = pos + 8 + unpack(buf, pos)[0]
        if end > size:
            raise cur.error(f"string {i} runs past the end of the file", key)
        try:
            out.append(str(buf[pos + 8 : end], "utf-8"))
        except UnicodeDecodeError:
            raise cur.error(f"string {i} is not valid UTF-8", key) from None
        pos = end
    cur.pos = pos
    return out


def _kind(vtype: ValueType, etype: ValueType | None) -> str:
    if vtype == ValueType.ARRAY:
        return f"list[{_kind(etype, None) if etype is not None else '?'}]"
    if vtype in (ValueType.FLOAT32, ValueType.FLOAT64):
        return "float"
    return {ValueType.BOOL: "bool", ValueType.STRING: "str", ValueType.ARRAY: "list"}.get(vtype, "int")


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version and the two counts, each bounded by the bytes that could hold them."""
    if cur.size == 0:
        raise cur.error("file is empty (0 bytes)", "magic")
    magic = cur.buf[cur.take(min(4, cur.size), "magic") : 4]
    if magic != GGUF_MAGIC:
        raise cur.error(f"expected {GGUF_MAGIC!r}, found {magic!r}", "magic")
    version = cur.scalar(_U32, "version")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise cur.error("big-endian GGUF files are not supported", "version")
        raise cur.error(f"unsupported version {version}; Corral reads versions 2 and 3", "version")
    n_tensors = cur.scalar(_U64, "tensor_count")
    n_kv = cur.scalar(_U64, "kv_count")
    if n_kv * _MIN_KV_BYTES > cur.left:
        raise cur.error(f"{n_kv} key/values cannot fit in the {cur.left} bytes left in the file", "kv_count")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left - n_kv * _MIN_KV_BYTES:
        raise cur.error(f"{n_tensors} tensor infos cannot fit in the {cur.left} bytes left", "tensor_count")
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, tuple[ValueType, ValueType | None]]]:
    metadata: dict[str, Any] = {}
    types: dict[str, tuple[ValueType, ValueType | None]] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        if key in metadata:
            raise cur.error("duplicate key", key)
        vtype = cur.value_type(key)
        metadata[key], etype = _read_value(cur, vtype, key)
        types[key] = (vtype, etype)
    arch = metadata.get("general.architecture")
    expected = dict(KNOWN_KEY_KINDS)
    if isinstance(arch, str):
        expected.update({f"{arch}.{suffix}": kinds for suffix, kinds in KNOWN_ARCH_KEY_KINDS.items()})
    for key, (vtype, etype) in types.items():
        kind = _kind(vtype, etype)
        if key in expected and kind not in expected[key]:
            raise cur.error(f"value has type {kind}, expected {' or '.join(sorted(expected[key]))}", key)
    return metadata, types


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.error(f"must be a positive power of two, got {alignment}", "general.alignment")
    return alignment


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int, int]:
    """Name, torch shape, ggml type, offset relative to the data section, and byte size of one tensor."""
    name = cur.string(f"tensor {index} name")
    where = f"tensor {name!r}"
    n_dims = cur.scalar(_U32, where)
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.error(f"n_dims is {n_dims}; must be 1 to {MAX_DIMS}", where)
    ne = [cur.scalar(_U64, where) for _ in range(n_dims)]
    if 0 in ne:
        raise cur.error(f"has a zero dimension: ne={ne}", where)
    numel = 1
    for d in ne:
        numel *= d
    if numel > _INT64_MAX:
        raise cur.error(f"element count of dims ne={ne} overflows int64", where)
    ggml_type = cur.scalar(_U32, where)
    if ggml_type not in GGML_QUANT_SIZES:
        raise cur.error(f"unknown ggml type {ggml_type}", where)
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if ne[0] % block:
        raise cur.error(f"row length {ne[0]} is not a multiple of the {_type_name(ggml_type)} block {block}", where)
    offset = cur.scalar(_U64, where)
    return name, tuple(reversed(ne)), ggml_type, offset, numel // block * type_size


def _read_tensor_infos(cur: _Cursor, n_tensors: int, alignment: int) -> tuple[dict[str, TensorInfo], int]:
    raw = []
    for i in range(n_tensors):
        raw.append(_read_tensor_info(cur, i))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, offset, nbytes in raw:
        where = f"tensor {name!r}"
        if name in tensors:
            raise cur.error("duplicate tensor name", where)
        if offset % alignment:
            raise cur.error(f"offset {offset} is not a multiple of the alignment {alignment}", where)
        start = data_offset + offset
        if start + nbytes > cur.size:
            raise cur.error(f"data [{start}, {start + nbytes}) runs past the end of the file ({cur.size} bytes)", where)
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:]):
        if after.offset < before.offset + before.nbytes:
            raise cur.error(f"data overlaps tensor {before.name!r}", f"tensor {after.name!r}")
    return tensors, data_offset


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table; tensor data stays mapped, unread."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{'not a regular file' if path.exists() else 'no such file'}: {path}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError("file is empty (0 bytes)", path=str(path), field="magic")
        # A private (copy-on-write) mapping: torch can wrap it without a read-only warning, and nothing
        # written through it would ever reach the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        cur = _Cursor(buf, str(path))
        version, n_tensors, n_kv = _read_header(cur)
        metadata, types = _read_metadata(cur, n_kv)
        alignment = _alignment(cur, metadata)
        tensors, data_offset = _read_tensor_infos(cur, n_tensors, alignment)
    except BaseException:
        buf.close()
        raise
    return GGUFFile(path, version, metadata, types, tensors, alignment, data_offset, buf)
