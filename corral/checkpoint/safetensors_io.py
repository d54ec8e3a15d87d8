"""A validating reader and an atomic writer for the safetensors format.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the byte buffer; offsets are relative to the buffer's start. Every rule of the format is
checked here, on the header alone, before a single tensor is built (RELIABILITY.md 6-7), so a
hostile file costs at most one 100 MB header read and never an out-of-range view.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from corral.checkpoint.atomic import write_atomic
from corral.errors import FormatError

MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation uses
METADATA_KEY = "__metadata__"

# safetensors dtype name -> torch dtype; itemsize comes from torch.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Byte offset into the data buffer (after the header)."""
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    """File offset of the byte buffer: 8 + header length."""


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and fully validate the header of a safetensors file; no tensor data is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise FormatError(f"file is {size} bytes, shorter than the 8-byte header length",
                              path=str(path), field="header_length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit",
                              path=str(path), field="header_length")
        if n > size - 8:
            raise FormatError(f"header length {n} runs past the end of the {size}-byte file",
                              path=str(path), field="header_length")
        raw = f.read(n)
    header = _parse_json(raw, path)
    metadata = _parse_metadata(header.pop(METADATA_KEY, None), path)
    tensors = {name: _parse_entry(name, entry, path) for name, entry in header.items()}
    _check_layout(tensors, size - 8 - n, path)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=8 + n)


def _parse_json(raw: bytes, path: Path) -> dict:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise FormatError("duplicate key in header JSON", path=str(path), field=key)
            out[key] = value
        return out

    def no_constants(name: str) -> None:
        raise FormatError(f"non-standard JSON constant {name}", path=str(path), field="header")

    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError as exc:
        raise FormatError(f"header is not UTF-8 ({exc.reason} at byte {exc.start})",
                          path=str(path), field="header") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"header is not valid JSON ({exc})", path=str(path), field="header") from None
    if not isinstance(header, dict):
        raise FormatError(f"header is a JSON {type(header).__name__}, not an object", path=str(path), field="header")
    return header


def _parse_metadata(metadata: object, path: Path) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("must be an object of string values", path=str(path), field=METADATA_KEY)
    return metadata


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: object, path: Path) -> TensorEntry:
    where = str(path)
    if not isinstance(entry, dict):
        raise FormatError("tensor entry is not a JSON object", path=where, field=name)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise FormatError(f"tensor entry has no {key!r}", path=where, field=f"{name}.{key}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"unknown dtype {dtype!r}", path=where, field=f"{name}.dtype")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise FormatError(f"shape {shape!r} is not a list of non-negative integers", path=where, field=f"{name}.shape")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise FormatError(f"data_offsets {offsets!r} is not [begin, end]", path=where, field=f"{name}.data_offsets")
    begin, end = offsets
    if end < begin:
        raise FormatError(f"data_offsets end {end} is before begin {begin}", path=where,
                          field=f"{name}.data_offsets")
    torch_dtype = DTYPES[dtype]
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * torch_dtype.itemsize  # Python ints: no overflow however large the shape
    if expected != end - begin:
        raise FormatError(f"shape {shape} x {dtype} is {expected} bytes but data_offsets span {end - begin}",
                          path=where, field=f"{name}.data_offsets")
    return TensorEntry(dtype=torch_dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(tensors: dict[str, TensorEntry], buffer_bytes: int, path: Path) -> None:
    """Tensors must tile the buffer exactly: no overlap, no gap, nothing past its end."""
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise FormatError(f"data_offsets [{entry.begin}, {entry.end}] overlap the previous tensor "
                              f"(ends at {position})", path=str(path), field=f"{name}.data_offsets")
        if entry.begin > position:
            raise FormatError(f"data_offsets begin {entry.begin} leaves a gap after byte {position}",
                              path=str(path), field=f"{name}.data_offsets")
        if entry.end > buffer_bytes:
            raise FormatError(f"data_offsets end {entry.end} runs past the {buffer_bytes}-byte buffer",
                              path=str(path), field=f"{name}.data_offsets")
        position = entry.end
    if position != buffer_bytes:
        raise FormatError(f"tensors cover {position} bytes of a {buffer_bytes}-byte buffer; the rest is unaccounted",
                          path=str(path), field="data_offsets")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a validated safetensors file, backed by a private (copy-on-write) memory map.

    Writing to a returned tensor never changes the file. ``read_header(path).metadata`` has ``__metadata__``.
    """
    path = Path(path)
    header = read_header(path)
    if header.data_start == path.stat().st_size:  # an empty buffer cannot be mapped
        return {name: torch.empty(entry.shape, dtype=entry.dtype) for name, entry in header.tensors.items()}
    with open(path, "rb") as f:
        # ACCESS_COPY gives a writable buffer (torch.frombuffer warns on read-only ones) whose writes stay private.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if len(mapped) != path.stat().st_size:
        raise FormatError("file changed while it was being read", path=str(path))
    return {name: _tensor_view(mapped, header.data_start, entry) for name, entry in header.tensors.items()}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` object of a validated safetensors file ({} when absent)."""
    return read_header(path).metadata


def _tensor_view(mapped: mmap.mmap, data_start: int, entry: TensorEntry) -> torch.Tensor:
    nbytes = entry.end - entry.begin
    if nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    offset = data_start + entry.begin
    if offset % entry.dtype.itemsize:
        # The format does not require alignment; a misaligned typed view is undefined behaviour, so copy.
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset).clone()
        return raw.view(entry.dtype).reshape(entry.shape)
    numel = nbytes // entry.dtype.itemsize
    return torch.frombuffer(mapped, dtype=entry.dtype, count=numel, offset=offset).reshape(entry.shape)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (any device, layout or sharing) to ``path`` atomically, one tensor in memory at a time."""
    for name, tensor in tensors.items():
        if name == METADATA_KEY or not isinstance(name, str):
            raise ValueError(f"invalid tensor name {name!r}")
        if tensor.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str")
    # Widest dtype first, so every tensor starts at a multiple of its itemsize (the header is padded to 8).
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, object] = {METADATA_KEY: dict(metadata)} if metadata else {}
    position = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.dtype.itemsize
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [position, position + nbytes]}
        position += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in order:
                tensor = tensors[name].detach().to("cpu").contiguous()
                if tensor.numel():
                    f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))

    write_atomic(path, write)
