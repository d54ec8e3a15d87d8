"""Text sources: files named directly or found in directories, and the documents each one holds.

A JSONL file (the first line parses as a JSON object) gives one document per line, its "text" key; any
other file is one document. Malformed records are FormatErrors naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from corral.errors import FormatError


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
