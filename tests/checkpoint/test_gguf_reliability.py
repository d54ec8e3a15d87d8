"""RELIABILITY.md items 1-5 and 10 for GGUF: hostile headers get a FormatError naming the field, never a crash."""

import struct
import time
import tracemalloc

import pytest
import torch
from gguf_fixtures import (
    ARR,
    STR,
    U8,
    U32,
    build,
    gstr,
    header,
    kv,
    small_valid,
    tensor_info,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.checkpoint.gguf import load_gguf, read_gguf
from corral.checkpoint.gguf_write import export_gguf
from corral.errors import FormatError
from corral.model.config import ModelConfig


def read_bytes(tmp_path, data: bytes):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return read_gguf(path)


def refused(tmp_path, data: bytes, *fragments: str) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_bytes(tmp_path, data)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return info.value


def f32_file(infos, data=b"\0" * 64, kvs=(), **kw) -> bytes:
    return build(list(kvs), infos, data, **kw)


# --- item 1: empty, truncated, bad magic, bad version ---------------------------------------------------------------

def test_read_refuses_empty_file_naming_magic(tmp_path):
    err = refused(tmp_path, b"", "magic", "empty")
    assert err.field == "magic"


def test_read_refuses_file_with_only_magic_naming_version(tmp_path):
    err = refused(tmp_path, b"GGUF", "version")
    assert err.field == "version"


@pytest.mark.parametrize("magic", [b"GGUG", b"\0\0\0\0", b"FUGG", b"PK\x03\x04"])
def test_read_refuses_bad_magic_naming_magic(tmp_path, magic):
    refused(tmp_path, header(0, 0, magic=magic), "magic", repr(magic))


@pytest.mark.parametrize("data", [b"G", b"GG", b"GGU"])
def test_read_refuses_file_shorter_than_magic(tmp_path, data):
    refused(tmp_path, data, "magic")


@pytest.mark.parametrize("version", [0, 1, 4, 999, 2**32 - 1])
def test_read_refuses_unsupported_version_naming_version(tmp_path, version):
    err = refused(tmp_path, header(0, 0, version=version), "version", str(version))
    assert err.field == "version"


def test_read_refuses_big_endian_file_by_name(tmp_path):
    refused(tmp_path, b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "version", "big-endian")


@pytest.mark.parametrize("cut", [5, 8, 12, 20, 23])
def test_read_refuses_truncated_header_naming_the_field(tmp_path, cut):
    err = refused(tmp_path, header(0, 0)[:cut])
    assert err.field in ("version", "tensor_count", "kv_count")


def test_read_accepts_versions_2_and_3_with_nothing_in_them(tmp_path):
    for version in (2, 3):
        gguf = read_bytes(tmp_path, header(0, 0, version=version))
        assert (gguf.version, gguf.metadata, gguf.tensors) == (version, {}, {})
        gguf.close()


# --- item 2: absurd counts are refused before allocating ------------------------------------------------------------

@pytest.mark.parametrize("n_tensors,n_kv,field", [(2**64 - 1, 0, "tensor_count"), (0, 2**64 - 1, "kv_count"),
                                                  (2**64 - 1, 2**64 - 1, "kv_count"), (2**40, 0, "tensor_count")])
def test_read_refuses_huge_counts_in_24_byte_file_fast_and_small(tmp_path, n_tensors, n_kv, field):
    data = header(n_tensors, n_kv)
    assert len(data) == 24
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(FormatError) as info:
            read_gguf(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.field == field and field in str(info.value)
    assert elapsed < 0.1, f"took {elapsed:.3f}s"
    assert peak < 10 * 2**20, f"peak traced allocation {peak} bytes"


def test_read_refuses_counts_just_over_what_the_bytes_can_hold(tmp_path):
    one_kv = kv("k", U8, 1)
    refused(tmp_path, build([one_kv], [], n_kv=2, alignment=1), "kv_count")
    refused(tmp_path, build([], [tensor_info("t", [1])], b"\0" * 32, n_tensors=40), "tensor_count")


# --- item 3: string and array lengths past the end of the file ------------------------------------------------------

def test_read_refuses_key_length_past_eof(tmp_path):
    data = header(0, 1) + struct.pack("<Q", 2**64 - 1) + b"abc" * 10
    refused(tmp_path, data, "key 0", "remain")


def test_read_refuses_string_value_length_past_eof(tmp_path):
    data = header(0, 1) + gstr("general.name") + struct.pack("<IQ", STR, 2**63) + b"x"
    refused(tmp_path, data, "general.name")


@pytest.mark.parametrize("etype", [U8, U32, STR, ARR])
def test_read_refuses_array_count_past_eof_without_memory_error(tmp_path, etype):
    data = header(0, 1) + gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, etype, 2**62) + b"\0" * 16
    refused(tmp_path, data, "tokenizer.ggml.tokens", "past the end")


def test_read_refuses_string_inside_array_running_past_eof(tmp_path):
    data = header(0, 1) + gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, STR, 2)
    data += gstr("ok") + struct.pack("<Q", 1000) + b"short"
    refused(tmp_path, data, "tokenizer.ggml.tokens", "string 1")


def test_read_refuses_tensor_name_length_past_eof(tmp_path):
    data = header(1, 0) + struct.pack("<Q", 2**64 - 2) + b"\0" * 40
    refused(tmp_path, data, "tensor 0 name")


def test_read_refuses_arrays_nested_too_deep(tmp_path):
    nested = (U8, [1])
    for _ in range(12):
        nested = (ARR, [nested])
    refused(tmp_path, build([kv("deep", ARR, nested)], []), "deep", "nested")


def test_read_refuses_invalid_utf8_and_unknown_value_type(tmp_path):
    refused(tmp_path, build([kv("general.name", STR, b"\xff\xfe")], []), "general.name", "UTF-8")
    refused(tmp_path, header(0, 1) + gstr("k") + struct.pack("<I", 13) + b"\0" * 8, "k", "value type 13")
    refused(tmp_path, build([kv("b", 7, 2)], []), "b", "bool")


# --- item 4: dims ---------------------------------------------------------------------------------------------------

def test_read_refuses_more_than_four_dims(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [1, 1, 1, 1, 1])]), "'w'", "n_dims is 5")


def test_read_refuses_zero_dims_count(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [])]), "'w'", "n_dims is 0")


def test_read_refuses_a_zero_dimension(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [4, 0])]), "'w'", "zero dimension")


@pytest.mark.parametrize("ne", [[2**32, 2**32], [2**63, 1], [2**64 - 1], [2**21, 2**21, 2**21]])
def test_read_refuses_element_count_overflowing_int64(tmp_path, ne):
    refused(tmp_path, f32_file([tensor_info("w", ne)]), "'w'", "int64")


def test_read_refuses_huge_but_representable_tensor_as_past_eof(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [2**30, 2**30])]), "'w'", "past the end")


def test_read_refuses_row_not_a_whole_number_of_blocks(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [33], ggml_type=8)]), "'w'", "block")


def test_read_refuses_unknown_ggml_type(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [4], ggml_type=1000)]), "'w'", "ggml type 1000")


# --- item 5: offsets, duplicates, alignment, value types ------------------------------------------------------------

def test_read_refuses_tensor_data_past_eof(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [16])], data=b"\0" * 60), "'w'", "past the end")
    refused(tmp_path, f32_file([tensor_info("w", [4], offset=2**64 - 32)]), "'w'", "past the end")


def test_read_refuses_misaligned_offset(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [4], offset=4)]), "'w'", "alignment 32")


def test_read_refuses_overlapping_tensors(tmp_path):
    refused(tmp_path, f32_file([tensor_info("a", [16]), tensor_info("b", [4], offset=32)]), "'b'", "overlaps")


def test_read_refuses_duplicate_tensor_name(tmp_path):
    refused(tmp_path, f32_file([tensor_info("w", [4]), tensor_info("w", [4], offset=32)]), "'w'", "duplicate")


def test_read_refuses_duplicate_key(tmp_path):
    refused(tmp_path, build([kv("general.name", STR, "a"), kv("general.name", STR, "b")], []), "general.name",
            "duplicate")


@pytest.mark.parametrize("alignment", [0, 3, 48, 2**32 - 1])
def test_read_refuses_alignment_zero_or_not_power_of_two(tmp_path, alignment):
    err = refused(tmp_path, build([kv("general.alignment", U32, alignment)], []), "power of two", str(alignment))
    assert err.field == "general.alignment"


def test_read_honours_a_valid_custom_alignment(tmp_path):
    data = build([kv("general.alignment", U32, 64)], [tensor_info("w", [4], offset=0)], alignment=64)
    data += struct.pack("<4f", 1, 2, 3, 4)
    with read_bytes(tmp_path, data) as gguf:
        assert gguf.alignment == 64 and gguf.data_offset % 64 == 0
        assert gguf.tensor("w").tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("key,entry", [
    ("general.alignment", kv("general.alignment", STR, "32")),
    ("general.architecture", kv("general.architecture", U32, 1)),
    ("tokenizer.ggml.tokens", kv("tokenizer.ggml.tokens", ARR, (U32, [1, 2]))),
    ("tokenizer.ggml.token_type", kv("tokenizer.ggml.token_type", ARR, (STR, ["1"]))),
    ("tokenizer.ggml.bos_token_id", kv("tokenizer.ggml.bos_token_id", STR, "1")),
    ("tokenizer.ggml.add_bos_token", kv("tokenizer.ggml.add_bos_token", U8, 1)),
])
def test_read_refuses_wrong_value_type_for_known_key(tmp_path, key, entry):
    err = refused(tmp_path, build([entry], []), key, "expected")
    assert err.field == key


def test_read_refuses_wrong_value_type_for_architecture_key(tmp_path):
    entries = [kv("general.architecture", STR, "llama"), kv("llama.block_count", STR, "2")]
    refused(tmp_path, build(entries, []), "llama.block_count", "expected int")


def test_read_error_never_includes_the_file_path_in_its_message(tmp_path):
    err = refused(tmp_path, header(0, 0, version=1))
    assert str(tmp_path) not in str(err) and err.path == str(tmp_path / "model.gguf")


# --- item 10: random mutations --------------------------------------------------------------------------------------

EXTREME = [0, 1, 2**7, 2**8 - 1, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def _tiny_model_bytes(tmp_path_factory) -> bytes:
    config = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=4, ffn_hidden_dim=8, max_seq_len=16,
                         use_scaled_rope=True)
    from corral.checkpoint.base import weight_shapes

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in weight_shapes(config).items()}
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    export_gguf(config, state, path, metadata={"tokenizer.ggml.tokens": ["a", "b", "c", "d"]})
    return path.read_bytes()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return {"parser": small_valid(), "model": _tiny_model_bytes(tmp_path_factory)}


@st.composite
def mutations(draw, size: int):
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]))
        at = draw(st.integers(0, size))
        if kind == "flip":
            ops.append((kind, at, draw(st.integers(0, 7))))
        elif kind == "insert":
            ops.append((kind, at, draw(st.binary(min_size=1, max_size=16))))
        elif kind == "delete":
            ops.append((kind, at, draw(st.integers(1, 16))))
        elif kind == "truncate":
            ops.append((kind, at, None))
        else:
            ops.append((kind, at, (draw(st.sampled_from(EXTREME)), draw(st.sampled_from([1, 2, 4, 8])))))
    return ops


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, at, arg in ops:
        at = min(at, len(buf))
        if kind == "flip" and at < len(buf):
            buf[at] ^= 1 << arg
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at : at + arg]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "overwrite":
            number, width = arg
            buf[at : at + width] = (number % 2 ** (8 * width)).to_bytes(width, "little")
    return bytes(buf)


def exercise(path, which: str) -> None:
    if which == "model":
        load_gguf(path)
        return
    with read_gguf(path) as gguf:
        for name in gguf.tensors:
            gguf.tensor(name)


@pytest.mark.parametrize("which", ["parser", "model"])
@settings(max_examples=1000, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_gguf_gives_only_format_error_fast(tmp_path, seeds, which, data):
    seed = seeds[which]
    mutated = mutate(seed, data.draw(mutations(len(seed))))
    path = tmp_path / "m.gguf"
    path.write_bytes(mutated)
    start = time.perf_counter()
    try:
        exercise(path, which)
    except FormatError:
        pass
    assert time.perf_counter() - start < 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_unmutated_seeds_load(tmp_path, seeds):
    for which, seed in seeds.items():
        path = tmp_path / f"{which}.gguf"
        path.write_bytes(seed)
        exercise(path, which)
