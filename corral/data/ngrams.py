"""Word n-grams for overlap checks: decontamination of evaluation data against training text.

Text is lower-cased and cut into words at every non-alphanumeric character (so punctuation and spacing
do not hide an overlap); an n-gram is n consecutive words. GPT-3 (Brown et al. 2020, appendix C) flags a
test example sharing any 13-gram with the training set; Llama 3 (2024, section 5.1.4) counts 8-gram token
overlap. Each n-gram is kept as an 8-byte BLAKE2b hash, stable across processes, so an index of a large
corpus is a set of ints and can be saved and shared (the curation pipeline drops training documents by it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

_SPLIT = re.compile(r"[^0-9a-z]+")


def words(text: str) -> list[str]:
    return [w for w in _SPLIT.split(text.lower()) if w]


def ngram_hashes(text: str, n: int = 13) -> Iterator[int]:
    """The hash of every n-word window of text (none when it has fewer than n words)."""
    ws = words(text)
    for i in range(len(ws) - n + 1):
        yield int.from_bytes(hashlib.blake2b(" ".join(ws[i:i + n]).encode(), digest_size=8).digest(), "little")


class NgramIndex:
    """The n-grams of a set of texts; `hits(text)` counts a new text's n-grams found in it."""

    def __init__(self, n: int = 13, texts: Iterable[str] = ()):
        self.n = n
        self.hashes: set[int] = set()
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self.hashes.update(ngram_hashes(text, self.n))

    def hits(self, text: str) -> int:
        return sum(h in self.hashes for h in ngram_hashes(text, self.n))

    def __len__(self) -> int:
        return len(self.hashes)
