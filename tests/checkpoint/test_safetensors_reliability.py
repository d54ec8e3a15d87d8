"""RELIABILITY.md 6, 7 and 10 for safetensors: hand-built hostile headers are refused with a FormatError
naming the field, and random mutations of small valid files give only FormatError or a clean read."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutations import mutated_bytes

from corral.checkpoint.base import weight_shapes
from corral.checkpoint.hf import export_hf, load_hf
from corral.checkpoint.safetensors_io import (
    read_header,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors,
)
from corral.errors import FormatError
from corral.model.config import ModelConfig


def _raw(header: object | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _refused(tmp_path: Path, content: bytes) -> FormatError:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError) as info:
        read_safetensors(path)
    assert info.value.path == str(path)
    return info.value


# ---- item 6: the header itself --------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\x01", b"\x00" * 7])
def test_read_refuses_file_under_8_bytes(tmp_path, content):
    err = _refused(tmp_path, content)
    assert err.field == "header_length" and "shorter than the 8-byte" in str(err)


def test_read_refuses_header_length_over_100mb_before_reading_it(tmp_path):
    err = _refused(tmp_path, _raw(b"{}", length=100_000_001))
    assert err.field == "header_length" and "exceeds the 100000000-byte limit" in str(err)
    err = _refused(tmp_path, _raw(b"{}", length=2**64 - 1))
    assert err.field == "header_length"


def test_read_refuses_header_length_past_end_of_file(tmp_path):
    err = _refused(tmp_path, _raw(b"{}", length=3))  # 3 <= limit, but file holds only 2 header bytes
    assert err.field == "header_length" and "runs past the end" in str(err)


@pytest.mark.parametrize("header, match", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', "not valid JSON"),
    (b"[]", "JSON list, not an object"),
    (b'"text"', "JSON str, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"a": NaN}', "non-standard JSON constant"),
])
def test_read_refuses_header_that_is_not_a_utf8_json_object(tmp_path, header, match):
    err = _refused(tmp_path, _raw(header))
    assert err.field == "header" and match in str(err)


def test_read_refuses_duplicate_tensor_names(tmp_path):
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    err = _refused(tmp_path, _raw(f'{{"a": {entry}, "a": {entry}}}'.encode(), b"\x00"))
    assert err.field == "a" and "duplicate" in str(err)


def test_read_refuses_metadata_that_is_not_strings(tmp_path):
    err = _refused(tmp_path, _raw({"__metadata__": {"format": 1}}))
    assert err.field == "__metadata__"


# ---- item 7: tensor entries and the byte buffer --------------------------------------------

def _entry(**changes) -> dict:
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize("entry, field, match", [
    ([1, 2], "w", "not a JSON object"),
    (_entry(dtype=None), "w.dtype", "no 'dtype'"),
    (_entry(shape=None), "w.shape", "no 'shape'"),
    (_entry(data_offsets=None), "w.data_offsets", "no 'data_offsets'"),
    (_entry(dtype="F7"), "w.dtype", "unknown dtype 'F7'"),
    (_entry(dtype=4), "w.dtype", "unknown dtype 4"),
    (_entry(shape=[-2]), "w.shape", "not a list of non-negative integers"),
    (_entry(shape=["2"]), "w.shape", "not a list of non-negative integers"),
    (_entry(shape=[True, True]), "w.shape", "not a list of non-negative integers"),
    (_entry(shape=2), "w.shape", "not a list of non-negative integers"),
    (_entry(shape=[2.0]), "w.shape", "not a list of non-negative integers"),
    (_entry(data_offsets=[0]), "w.data_offsets", "is not [begin, end]"),
    (_entry(data_offsets=[0, 8, 9]), "w.data_offsets", "is not [begin, end]"),
    (_entry(data_offsets=[-8, 0]), "w.data_offsets", "is not [begin, end]"),
    (_entry(data_offsets={"begin": 0}), "w.data_offsets", "is not [begin, end]"),
    (_entry(data_offsets=[8, 0]), "w.data_offsets", "before begin"),
    (_entry(shape=[3]), "w.data_offsets", "shape [3] x F32 is 12 bytes but data_offsets span 8"),
    (_entry(shape=[2**40, 2**40]), "w.data_offsets", "but data_offsets span 8"),
    (_entry(dtype="BF16"), "w.data_offsets", "is 4 bytes but data_offsets span 8"),
])
def test_read_refuses_ill_formed_tensor_entry(tmp_path, entry, field, match):
    err = _refused(tmp_path, _raw({"w": entry}, b"\x00" * 8))
    assert err.field == field and match in str(err)


def test_read_refuses_overlapping_offsets(tmp_path):
    header = {"a": _entry(data_offsets=[0, 8]), "b": _entry(data_offsets=[4, 12])}
    err = _refused(tmp_path, _raw(header, b"\x00" * 12))
    assert err.field == "b.data_offsets" and "overlap" in str(err)


def test_read_refuses_gap_between_tensors(tmp_path):
    header = {"a": _entry(data_offsets=[0, 8]), "b": _entry(data_offsets=[12, 20])}
    err = _refused(tmp_path, _raw(header, b"\x00" * 20))
    assert err.field == "b.data_offsets" and "gap" in str(err)


def test_read_refuses_offsets_past_the_buffer(tmp_path):
    header = {"a": _entry(data_offsets=[0, 8]), "b": _entry(data_offsets=[8, 16])}
    err = _refused(tmp_path, _raw(header, b"\x00" * 12))
    assert err.field == "b.data_offsets" and "runs past the 12-byte buffer" in str(err)


def test_read_refuses_trailing_bytes_no_tensor_claims(tmp_path):
    err = _refused(tmp_path, _raw({"a": _entry()}, b"\x00" * 9))
    assert err.field == "data_offsets" and "cover 8 bytes of a 9-byte buffer" in str(err)


# ---- valid files -----------------------------------------------------------------------------

def test_read_accepts_library_written_file_and_library_reads_ours(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16), "i": torch.arange(4),
               "b": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    ours = read_safetensors(tmp_path / "lib.safetensors")
    write_safetensors(ours, tmp_path / "ours.safetensors", metadata={"format": "pt", "note": "x"})
    theirs = load_file(tmp_path / "ours.safetensors")
    for name, tensor in tensors.items():
        for other in (ours[name], theirs[name]):
            assert other.dtype == tensor.dtype and other.shape == tensor.shape and torch.equal(other, tensor), name
    assert read_safetensors_metadata(tmp_path / "ours.safetensors") == {"format": "pt", "note": "x"}


def test_read_copies_misaligned_tensor_correctly(tmp_path):
    values = torch.tensor([1.5, -2.25], dtype=torch.float32)
    header = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[2],' \
             b'"data_offsets":[1,9]}}'
    header += b" " * (-len(header) % 8)  # padding the format allows
    path = tmp_path / "x.safetensors"
    path.write_bytes(_raw(header, b"\x07" + values.numpy().tobytes()))
    assert read_header(path).data_start % 4 == 0  # so "w" at buffer offset 1 is misaligned
    out = read_safetensors(path)
    assert torch.equal(out["w"], values) and out["a"].tolist() == [7]


def test_read_tensors_are_private_copies_on_write(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors({"w": torch.ones(4)}, path)
    before = path.read_bytes()
    read_safetensors(path)["w"].mul_(3)
    assert path.read_bytes() == before and torch.equal(read_safetensors(path)["w"], torch.ones(4))


def test_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors({"w": torch.ones(4)}, path)
    before = path.read_bytes()
    with pytest.raises(NotImplementedError):  # copying a meta-device tensor's data fails mid-write
        write_safetensors({"a": torch.zeros(4), "b": torch.empty(4, device="meta")}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]


# ---- item 10: random mutations -------------------------------------------------------------

def _valid_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        gen = torch.Generator().manual_seed(0)
        tensors = {"w": torch.randn(4, 3, generator=gen), "h": torch.randn(5, generator=gen).half(),
                   "ids": torch.arange(3)}
        write_safetensors(tensors, Path(d) / "x.safetensors", metadata={"format": "pt"})
        return (Path(d) / "x.safetensors").read_bytes()


VALID = _valid_bytes()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@settings(max_examples=1000, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(content=mutated_bytes(VALID, HEADER_END))
def test_mutated_safetensors_gives_only_format_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(content)
        start = time.perf_counter()
        try:
            tensors = read_safetensors(path)
        except FormatError as exc:
            assert exc.path == str(path)
        else:
            assert all(isinstance(t, torch.Tensor) for t in tensors.values())
            for t in tensors.values():
                t.sum() if t.dtype != torch.bool else t.any()  # every view is readable: no out-of-range pages
        assert time.perf_counter() - start < 1.0
        assert os.listdir(d) == ["x.safetensors"]


@st.composite
def hostile_header(draw) -> dict:
    dims = st.one_of(st.integers(-2, 6), st.integers(2**31, 2**70), st.booleans(), st.floats(0, 4), st.text(max_size=2))
    header = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=3), max_size=4, unique=True)):
        entry = {}
        if draw(st.integers(0, 9)):
            names = st.sampled_from(["F32", "U8", "BF16", "I64", "F8_E4M3"])
            entry["dtype"] = draw(st.one_of(names, st.text(max_size=3)))
        if draw(st.integers(0, 9)):
            entry["shape"] = draw(st.lists(dims, max_size=3))
        if draw(st.integers(0, 9)):
            entry["data_offsets"] = draw(st.lists(st.one_of(st.integers(-1, 40), dims), min_size=1, max_size=3))
        header[name] = entry
    return header


@settings(max_examples=1000, deadline=1000)
@given(header=hostile_header(), data=st.binary(max_size=40))
def test_hostile_header_values_give_only_format_error(header, data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(_raw(header, data))
        try:
            tensors = read_safetensors(path)
        except FormatError:
            return
        # Accepted: then it really was well formed and every byte is accounted for.
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == len(data)


TINY = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, multiple_of=8, max_seq_len=32)


def _tiny_hf_dir() -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as d:
        gen = torch.Generator().manual_seed(1)
        state = {k: torch.randn(s, generator=gen) for k, s in weight_shapes(TINY).items()}
        export_hf(TINY, state, d)
        return (Path(d) / "config.json").read_bytes(), (Path(d) / "model.safetensors").read_bytes()


TINY_CONFIG, TINY_WEIGHTS = _tiny_hf_dir()


@settings(max_examples=500, deadline=1000)
@given(content=mutated_bytes(TINY_WEIGHTS, 8 + struct.unpack("<Q", TINY_WEIGHTS[:8])[0]))
def test_mutated_hf_weights_give_only_format_error_from_load_hf(content):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_bytes(TINY_CONFIG)
        (Path(d) / "model.safetensors").write_bytes(content)
        try:
            ckpt = load_hf(d)
        except FormatError:
            pass
        else:
            assert len(ckpt.state_dict) == len(weight_shapes(TINY))
        assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
