"""Curation readers: an input file -> Documents, the format decided by the file's bytes, never its name.

gzip (1f 8b) and zstd (28 b5 2f fd) are unwrapped first; then "WARC/" starts a WARC file (warcio; HTML
responses become text through corral.data.html), "PAR1" a Parquet file, "{" a JSONL file, anything else
is one plain-text document. A bad record never stops the run: it is skipped and counted under a reason
in the reader's stats (invalid_json, no_text, undecodable_bytes, record_too_large, truncated_stream,
warc_bad_record, html_too_large, html_too_deep, ...), or, with ``strict``, raised as a FormatError naming
the file and record.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from corral.data.documents import Document, StepStats
from corral.data.html import extract_text
from corral.errors import FormatError

GZIP, ZSTD, PARQUET, WARC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1", b"WARC/"


class Reader:
    """Reads files into Documents; ``stats`` counts records seen, kept and skipped by reason."""

    name = "reader"

    def __init__(self, *, text_key: str = "text", id_key: str = "id", strict: bool = False,
                 max_record_bytes: int = 10_000_000, max_html_bytes: int = 5_000_000, max_html_depth: int = 512):
        self.text_key, self.id_key, self.strict = text_key, id_key, strict
        self.max_record_bytes, self.max_html_bytes, self.max_html_depth = (
            max_record_bytes, max_html_bytes, max_html_depth)
        self.stats = StepStats()

    def read(self, path: str | Path) -> Iterator[Document]:
        path = Path(path)
        with open(path, "rb") as raw:
            stream = _unwrap(raw)
            head = stream.peek(8)[:8] if hasattr(stream, "peek") else b""
            if head.startswith(PARQUET):
                kind = self._parquet
            elif head.startswith(WARC):
                kind = self._warc
            elif head.lstrip()[:1] == b"{":
                kind = self._jsonl
            else:
                kind = self._text
            try:
                for doc in kind(path, stream):
                    self.stats.kept += 1
                    yield doc
            except (EOFError, OSError) as exc:  # gzip/zstd cut short: keep what was read, count the cut
                self.skip(path, "end", "truncated_stream", str(exc))

    def skip(self, path: Path, where: str, reason: str, detail: str = "") -> None:
        """Count a skipped record, or raise when strict."""
        self.stats.seen += 1
        if self.strict:
            raise FormatError(f"{path}: {where}: {reason}{': ' + detail if detail else ''}",
                              path=str(path), field=where)
        self.stats.dropped[reason] += 1

    def _jsonl(self, path: Path, stream: IO[bytes]) -> Iterator[Document]:
        for lineno, line in enumerate(_lines(stream, self.max_record_bytes), 1):
            where = f"line {lineno}"
            if line is None:
                self.skip(path, where, "record_too_large")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                self.skip(path, where, "undecodable_bytes")
                continue
            except json.JSONDecodeError as exc:
                self.skip(path, where, "invalid_json", exc.msg)
                continue
            if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
                self.skip(path, where, "no_text")
                continue
            self.stats.seen += 1
            record["text"] = record.pop(self.text_key)
            if self.id_key != "id" and self.id_key in record:
                record["id"] = record.pop(self.id_key)
            yield Document.from_record(record, f"{path.name}/{lineno}")

    def _text(self, path: Path, stream: IO[bytes]) -> Iterator[Document]:
        data = stream.read(self.max_record_bytes + 1)
        if len(data) > self.max_record_bytes:
            self.skip(path, "file", "record_too_large")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.skip(path, "file", "undecodable_bytes")
            return
        if text.strip():
            self.stats.seen += 1
            yield Document(text, f"{path.name}/0", {"source_file": path.name})

    def _parquet(self, path: Path, stream: IO[bytes]) -> Iterator[Document]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(io.BytesIO(stream.read()))
        columns = [c for c in (self.text_key, self.id_key) if c in table.schema_arrow.names]
        if self.text_key not in columns:
            raise FormatError(f"{path}: Parquet file has no {self.text_key!r} column", path=str(path),
                              field=self.text_key)
        row = 0
        for batch in table.iter_batches(columns=columns):
            for record in batch.to_pylist():
                row += 1
                text = record.get(self.text_key)
                if not isinstance(text, str):
                    self.skip(path, f"row {row}", "no_text")
                    continue
                self.stats.seen += 1
                doc_id = record.get(self.id_key)
                yield Document(text, str(doc_id) if doc_id is not None else f"{path.name}/{row}", {})

    def _warc(self, path: Path, stream: IO[bytes]) -> Iterator[Document]:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        # check_digests="raise": a record whose Content-Length lies reads bytes that are not its own, so its
        # WARC-Block-Digest fails; without the check warcio only prints a warning and carries on.
        records = iter(ArchiveIterator(stream, check_digests="raise"))
        index = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except (ArchiveLoadFailed, ValueError) as exc:  # the file can't be resynchronised: stop here
                self.skip(path, f"record {index + 1}", "warc_bad_record", str(exc)[:200])
                return
            index += 1
            content_type = record.http_headers.get_header("Content-Type") if record.http_headers else None
            if record.rec_type != "response" or "html" not in (content_type or ""):
                continue
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            try:
                page = record.content_stream().read(self.max_html_bytes + 1)
            except (ArchiveLoadFailed, ValueError) as exc:
                self.skip(path, f"record {index} ({url})", "warc_bad_record", str(exc)[:200])
                continue
            text, reason = extract_text(page, max_bytes=self.max_html_bytes, max_depth=self.max_html_depth)
            if text is None:
                self.skip(path, f"record {index} ({url})", reason)
                continue
            self.stats.seen += 1
            doc_id = record.rec_headers.get_header("WARC-Record-ID") or f"{path.name}/{index}"
            yield Document(text, doc_id, {"url": url})


def _unwrap(raw: IO[bytes]) -> IO[bytes]:
    """The decompressed stream of a gzip or zstd file (by magic bytes), else the file itself, peekable."""
    buffered = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
    magic = buffered.peek(4)[:4]
    if magic.startswith(GZIP):
        return io.BufferedReader(gzip.GzipFile(fileobj=buffered))  # type: ignore[arg-type]
    if magic == ZSTD:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    return buffered


def _lines(stream: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """Lines of at most ``limit`` bytes; a longer line is read past in chunks and yields None (memory-bounded)."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while True:  # skip the rest of the oversized line without holding it
                rest = stream.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line
