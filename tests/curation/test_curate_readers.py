"""Readers: every format by its bytes, and bad input skipped with a counted reason (or raised when strict)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from corral.data.inputs import Reader
from corral.errors import FormatError

WARC_DIR = Path(__file__).parents[2] / "data/web/warc"


def jsonl(*texts: str) -> bytes:
    return b"".join(json.dumps({"id": f"d{i}", "text": t}).encode() + b"\n" for i, t in enumerate(texts))


def read(path: Path, **kw) -> tuple[list, Reader]:
    reader = Reader(**kw)
    return list(reader.read(path)), reader


def warc(pages: list[bytes]) -> bytes:
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=False)
    for i, page in enumerate(pages):
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(f"http://example.com/{i}", "response",
                                                      payload=io.BytesIO(page), http_headers=headers))
    return out.getvalue()


PAGE = b"<html><body><p>" + b"A real paragraph of text about gardens and rivers. " * 20 + b"</p></body></html>"


def test_real_warc_files_give_text_documents_with_urls():
    docs, reader = read(WARC_DIR / "sample-0000.warc.gz")
    assert len(docs) >= 15 and all(d.metadata["url"].startswith("http") for d in docs)
    assert sum(len(d.text) for d in docs) > 20_000 and "<div" not in docs[0].text


def test_gzip_zstd_and_parquet_are_read_by_content_not_name(tmp_path):
    import zstandard

    (tmp_path / "a.txt").write_bytes(gzip.compress(jsonl("one", "two")))
    (tmp_path / "b.json").write_bytes(zstandard.ZstdCompressor().compress(jsonl("three")))
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["four", "five"]}), tmp_path / "c.jsonl")
    texts = [d.text for name in ("a.txt", "b.json", "c.jsonl") for d in read(tmp_path / name)[0]]
    assert texts == ["one", "two", "three", "four", "five"]


def test_invalid_json_and_undecodable_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad = b'{"text": broken\n' + b'{"text": "\xff\xfe bytes"}\n' + b'[1, 2]\n'
    path.write_bytes(jsonl("good") + bad + jsonl("fine"))
    docs, reader = read(path)
    assert [d.text for d in docs] == ["good", "fine"]
    assert dict(reader.stats.dropped) == {"invalid_json": 1, "undecodable_bytes": 1, "no_text": 1}
    assert reader.stats.seen == reader.stats.kept + 3


def test_strict_mode_raises_naming_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl("good") + b"{oops\n")
    with pytest.raises(FormatError, match=r"bad.jsonl: line 2: invalid_json"):
        read(path, strict=True)


def test_truncated_gzip_keeps_what_was_read_and_counts_the_cut(tmp_path):
    data = gzip.compress(jsonl(*[f"document number {i} " * 50 for i in range(200)]))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    docs, reader = read(path)
    assert 0 < len(docs) < 200
    assert reader.stats.dropped["truncated_stream"] == 1


def test_oversized_line_is_skipped_without_holding_it(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(jsonl("before"))
        f.write(b'{"text": "' + b"x" * 100_000_000 + b'"}\n')  # 100 MB on one line
        f.write(jsonl("after"))
    docs, reader = read(path)
    assert [d.text for d in docs] == ["before", "after"]
    assert reader.stats.dropped == {"record_too_large": 1}


def test_warc_record_with_a_lying_content_length_is_counted_not_fatal(tmp_path):
    data = warc([PAGE, PAGE, PAGE])
    second = data.index(b"WARC/1.0", 10)
    length_at = data.index(b"Content-Length: ", second) + len(b"Content-Length: ")
    end = data.index(b"\r\n", length_at)
    lied = data[:length_at] + str(int(data[length_at:end]) + 700).encode() + data[end:]
    path = tmp_path / "lying.warc"
    path.write_bytes(lied)
    docs, reader = read(path)
    assert len(docs) >= 1 and reader.stats.dropped["warc_bad_record"] == 1


def test_html_bombs_are_skipped_with_their_reason(tmp_path):
    deep = b"<html><body>" + b"<div>" * 100_000 + b"x" + b"</div>" * 100_000 + b"</body></html>"
    huge = b"<html><body><p>" + b"a" * 100_000_000 + b"</p></body></html>"  # 100 MB on one line
    path = tmp_path / "bombs.warc.gz"
    path.write_bytes(gzip.compress(warc([PAGE, deep, huge, PAGE]), compresslevel=1))
    docs, reader = read(path)
    assert len(docs) == 2
    assert reader.stats.dropped == {"html_too_deep": 1, "html_too_large": 1}


def test_plain_text_file_is_one_document(tmp_path):
    (tmp_path / "notes").write_text("Just some text.\nOn two lines.\n")
    docs, _ = read(tmp_path / "notes")
    assert len(docs) == 1 and docs[0].text.startswith("Just some text.")
