"""Documents and the steps they stream through (STYLE.md item 10, after datatrove's BaseFilter).

A step is ``run(docs, rank, world_size) -> docs``: it reads an iterator of documents and yields the ones
it keeps, possibly changed. Every step counts what it saw, kept and dropped (by reason) in ``stats``, and
hands each dropped document with its reason to an exclusion writer, so a run can be audited. A filter
is a step defined by one method, ``keep(doc) -> (keep, reason)``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class Document:
    """One text with a stable id (source file + position) and free-form metadata (url, source, ...)."""

    text: str
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "text": self.text, "metadata": self.metadata},
                          ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_record(cls, record: dict[str, Any], default_id: str) -> Document:
        metadata = dict(record.get("metadata") or {})
        for key, value in record.items():
            if key not in ("text", "id", "metadata"):
                metadata.setdefault(key, value)
        return cls(text=record["text"], id=str(record.get("id", default_id)), metadata=metadata)


@dataclass
class StepStats:
    """What one step did: documents seen, kept, dropped by reason, and changed in place (by what)."""

    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)

    def merge(self, other: StepStats) -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.changed.update(other.changed)

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "changed": dict(sorted(self.changed.items()))}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StepStats:
        return cls(raw["seen"], raw["kept"], Counter(raw["dropped"]), Counter(raw.get("changed", {})))


Exclude = Callable[[str, Document, str], None]
"""(step name, dropped document, reason) -> None: where dropped documents go for audit."""


def _discard(step: str, doc: Document, reason: str) -> None:
    return None


class Step:
    """Base of every pipeline step; subclasses override ``process`` (or ``keep`` via Filter)."""

    name = "step"

    def __init__(self) -> None:
        self.stats = StepStats()
        self.exclude: Exclude = _discard

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in self.process(docs, rank, world_size):
            self.stats.kept += 1
            yield doc

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        raise NotImplementedError

    def drop(self, doc: Document, reason: str) -> None:
        self.stats.dropped[reason] += 1
        self.exclude(self.name, doc, reason)

    def count(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.stats.seen += 1
            yield doc


class Filter(Step):
    """A step that keeps or drops each document by itself: ``keep(doc) -> (keep, reason)``."""

    def keep(self, doc: Document) -> tuple[bool, str]:
        raise NotImplementedError

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for doc in self.count(docs):
            ok, reason = self.keep(doc)
            if ok:
                yield doc
            else:
                self.drop(doc, reason)


class ExclusionWriter:
    """Dropped documents as JSONL, one line each: {"step", "reason", "id", "text", "metadata"}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.path, "w", encoding="utf-8")

    def __call__(self, step: str, doc: Document, reason: str) -> None:
        self._file.write(json.dumps({"step": step, "reason": reason, "id": doc.id, "text": doc.text,
                                     "metadata": doc.metadata}, ensure_ascii=False, sort_keys=True) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExclusionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_steps(steps: list[Step], docs: Iterable[Document], rank: int = 0, world_size: int = 1,
              exclude: Exclude | None = None) -> Iterator[Document]:
    """Chain the steps lazily: one document at a time flows through all of them."""
    stream: Iterable[Document] = docs
    for step in steps:
        if exclude is not None:
            step.exclude = exclude
        stream = step.run(stream, rank, world_size)
    yield from stream
