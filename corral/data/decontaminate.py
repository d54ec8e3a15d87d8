"""Decontamination: drop (or mark) documents that share word n-grams with evaluation sets."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from corral.data.documents import Document, Step
from corral.data.ngrams import NgramIndex, index_eval_sets
from corral.errors import ConfigError


@dataclass
class DecontaminateConfig:
    eval_paths: list[str] = field(default_factory=lambda: ["data/eval"])
    """JSONL files or directories of evaluation sets (every string of every record is indexed)."""
    n: int = 13
    min_matches: int = 1
    """A document sharing at least this many distinct n-grams with one eval set is contaminated."""
    action: str = "drop"
    """"drop" removes it (reason "contaminated_<set>"); "report" keeps it with metadata["contamination"]."""


@lru_cache(maxsize=4)
def _index(paths: tuple[str, ...], n: int) -> NgramIndex:
    return index_eval_sets(paths, n)  # built once per process, shared by every shard it runs


class Decontaminate(Step):
    name = "decontaminate"

    def __init__(self, config: DecontaminateConfig | None = None):
        super().__init__()
        self.c = config or DecontaminateConfig()
        if self.c.action not in ("drop", "report"):
            raise ConfigError(f"decontaminate.action must be 'drop' or 'report', got {self.c.action!r}")

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        index = _index(tuple(self.c.eval_paths), self.c.n)
        for doc in self.count(docs):
            hits = {k: v for k, v in index.matches(doc.text).items() if v >= self.c.min_matches}
            if not hits:
                yield doc
                continue
            worst = max(sorted(hits), key=hits.__getitem__)
            if self.c.action == "drop":
                self.drop(doc, f"contaminated_{worst}")
                continue
            doc.metadata["contamination"] = dict(sorted(hits.items()))
            self.stats.changed[f"contaminated_{worst}"] += 1
            yield doc
