"""Deduplication: exact (normalised hash), near-duplicate MinHash LSH, and repeated lines in a shard.

Exact and MinHash dedup compare documents across all shards, so they run in two phases (as datatrove's
minhash stages do): every shard task computes one signature per kept document (``signatures``), then
one pass over all signatures in (shard, position) order (``resolve``) marks every document whose
earlier twin is kept. Order alone decides, so any number of workers gives the same drops.

MinHash (Broder 1997): the Jaccard similarity of two shingle sets equals the probability that their
minimum hashes under a random permutation agree. LSH (Leskovec et al., Mining of Massive Datasets ch. 3)
cuts the k = bands x rows hashes into bands; two documents are candidates when a whole band agrees,
with probability 1 - (1 - J^rows)^bands: 0.99 at J = 0.85 and 0.13 at J = 0.5 for 20 x 5... see
``candidate_probability``. The permutations are multiply-shift hashes of 64-bit shingle hashes
(Dietzfelbinger et al. 1997): ``(a * h + b) mod 2^64 >> 32`` with odd a.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from corral.data.documents import Document, Step

_WORD = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation dropped, whitespace collapsed: what "the same text" means here."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).lower()))


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the word n-grams of the normalised text (n_shingles,); one shingle if shorter."""
    words = normalize(text).split()
    if not words:
        return np.zeros(1, dtype=np.uint64)
    crc = {w: zlib.crc32(w.encode()) for w in set(words)}  # a stable hash (str's hash() is salted per process)
    ids = np.fromiter(map(crc.__getitem__, words), dtype=np.uint64, count=len(words))
    n = min(n, len(ids))
    # polynomial rolling combination, wrapping mod 2^64: h = sum_j ids[i + j] * P^j
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(0x100000001B3) + ids[j: len(ids) - n + 1 + j]
    return np.unique(h)


@dataclass
class MinHashConfig:
    ngram: int = 5
    """Words per shingle."""
    bands: int = 20
    rows: int = 5
    """bands x rows hashes per document; see candidate_probability."""
    seed: int = 1


class MinHasher:
    def __init__(self, config: MinHashConfig | None = None):
        self.c = c = config or MinHashConfig()
        rng = np.random.default_rng(c.seed)
        k = c.bands * c.rows
        self.a = rng.integers(1, 2**63, size=k, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=k, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(bands * rows,) uint32 minimum hashes."""
        h = shingle_hashes(text, self.c.ngram)[:, None]  # (n_shingles, 1)
        with np.errstate(over="ignore"):
            return ((h * self.a + self.b) >> np.uint64(32)).min(axis=0).astype(np.uint32)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Chance that LSH puts two documents of this Jaccard similarity in one bucket."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def exact_signature(text: str) -> np.ndarray:
    """The first 8 bytes of sha1(normalised text), as one uint64 (1,)."""
    return np.frombuffer(hashlib.sha1(normalize(text).encode()).digest()[:8], dtype=np.uint64).copy()


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the earlier document is the root, so it is the one kept
            self.parent[max(rx, ry)] = min(rx, ry)


def resolve(signatures: np.ndarray, bands: int) -> list[int]:
    """For (n_docs, k) signatures in global order: for each document, the index it duplicates, or -1.

    Documents sharing any band are clustered (transitively); the first of each cluster is kept.
    """
    n = len(signatures)
    uf = _UnionFind(n)
    rows = signatures.shape[1] // bands if n else 1
    for band in range(bands):
        first: dict[bytes, int] = {}
        block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        for i in range(n):
            key = block[i].tobytes()
            if key in first:
                uf.union(first[key], i)
            else:
                first[key] = i
    return [-1 if (root := uf.find(i)) == i else root for i in range(n)]


@dataclass
class ExactDedupConfig:
    pass


@dataclass
class LineDedupConfig:
    min_docs: int = 3
    """A line (or paragraph) found in at least this many documents of the shard is removed from all."""
    min_chars: int = 10
    """Shorter lines are left alone (blank lines, bullets)."""
    unit: str = "line"
    """"line" or "paragraph" (blank-line separated)."""


class LineDedup(Step):
    """Removes lines repeated across the documents of one shard (navigation, footers: CCNet's paragraph
    dedup, Wenzek et al. 2020); a document left empty is dropped as "all_lines_repeated"."""

    name = "line_dedup"

    def __init__(self, config: LineDedupConfig | None = None):
        super().__init__()
        self.c = config or LineDedupConfig()
        self.sep = "\n\n" if self.c.unit == "paragraph" else "\n"

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        shard = list(self.count(docs))  # two passes: count lines over the shard, then cut
        counts: dict[str, int] = {}
        for doc in shard:
            for unit in {u.strip() for u in doc.text.split(self.sep) if len(u.strip()) >= self.c.min_chars}:
                counts[unit] = counts.get(unit, 0) + 1
        repeated = {u for u, k in counts.items() if k >= self.c.min_docs}
        for doc in shard:
            kept = [u for u in doc.text.split(self.sep) if u.strip() not in repeated]
            if len(kept) == len(doc.text.split(self.sep)):
                yield doc
                continue
            doc.text = self.sep.join(kept).strip()
            if not doc.text:
                self.drop(doc, "all_lines_repeated")
                continue
            self.stats.changed["repeated_lines_removed"] += 1
            yield doc
