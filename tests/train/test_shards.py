"""Token shards: round trips, the Llama 3 tokenizer, and truncated or corrupted files (RELIABILITY.md 31)."""

from __future__ import annotations

import numpy as np
import pytest

from corral.data.readers import iter_documents
from corral.data.shards import HEADER, read_shard, write_shard
from corral.data.tokenize import prepare_shards
from corral.errors import FormatError


@pytest.mark.parametrize("top, itemsize", [(60000, 2), (128255, 4)])
def test_shard_round_trip_picks_smallest_dtype(tmp_path, top, itemsize):
    ids = np.array([0, 1, top, 7], dtype=np.int64)
    path = write_shard(tmp_path / "s.bin", ids)
    back = read_shard(path)
    assert back.dtype.itemsize == itemsize
    assert back.tolist() == ids.tolist()
    assert path.stat().st_size == HEADER.size + 4 * itemsize


def test_truncated_shard_is_format_error_naming_file(tmp_path):
    path = write_shard(tmp_path / "cut.bin", np.arange(100))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FormatError, match="cut.bin.*truncated") as info:
        read_shard(path)
    assert info.value.field == "n_tokens" and info.value.path == str(path)


def test_corrupted_shard_payload_is_format_error_naming_file(tmp_path):
    path = write_shard(tmp_path / "rot.bin", np.arange(100))
    data = bytearray(path.read_bytes())
    data[HEADER.size + 10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="rot.bin.*corrupted") as info:
        read_shard(path)
    assert info.value.field == "sha256"


@pytest.mark.parametrize("blob, field", [(b"", "header"), (b"NOTASHARD" + bytes(60), "magic")])
def test_not_a_shard_is_format_error(tmp_path, blob, field):
    path = tmp_path / "bad.bin"
    path.write_bytes(blob)
    with pytest.raises(FormatError) as info:
        read_shard(path)
    assert info.value.field == field and "bad.bin" in str(info.value)


def test_text_and_jsonl_are_tokenized_with_llama3_bos_and_eos(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "One"}\n{"text": "Two"}\n')
    assert list(iter_documents(tmp_path / "b.jsonl")) == ["One", "Two"]
    shards = prepare_shards([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "shards")
    a, b = (read_shard(p).tolist() for p in shards)
    assert a[0] == 128000 and a[-1] == 128001 and len(a) == 4  # <|begin_of_text|> Hello world <|end_of_text|>
    assert b.count(128000) == 2 and b.count(128001) == 2
    again = prepare_shards([tmp_path / "a.txt"], tmp_path / "shards")  # cached by content
    assert again[0] == shards[0]


def test_bad_jsonl_line_is_format_error_naming_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(FormatError, match="c.jsonl:2"):
        list(iter_documents(tmp_path / "c.jsonl"))
