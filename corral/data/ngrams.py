"""Word n-grams and an index of them: the shared core of decontamination (the curation step here,
``corral eval contamination`` elsewhere).

Text is normalised as dedup does (NFKC, lower case, punctuation dropped), so "The cat, sat." and "the
cat sat" share n-grams. An n-gram is kept as a 64-bit hash of its words; a collision needs 2^32
n-grams before it is likely. 13-grams are the default: GPT-3's contamination analysis (Brown et al. 2020,
appendix C) and Llama's (Touvron et al. 2023) use 13 and 8 words.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from corral.data.dedup import normalize, shingle_hashes


def ngrams(text: str, n: int = 13) -> list[str]:
    """The word n-grams of the normalised text, in order (empty when it has fewer than n words)."""
    words = normalize(text).split()
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def ngram_hashes(text: str, n: int = 13) -> np.ndarray:
    """Distinct 64-bit hashes of the word n-grams (empty when the text has fewer than n words)."""
    if len(normalize(text).split()) < n:
        return np.zeros(0, dtype=np.uint64)
    return shingle_hashes(text, n)


class NgramIndex:
    """n-gram hash -> the key (an eval set's name) of the first text that held it."""

    def __init__(self, n: int = 13):
        self.n = n
        self.owner: dict[int, str] = {}

    def add(self, text: str, key: str) -> int:
        """Index a text's n-grams under ``key``; returns how many it had."""
        hashes = ngram_hashes(text, self.n)
        for h in hashes.tolist():
            self.owner.setdefault(h, key)
        return len(hashes)

    def matches(self, text: str) -> Counter:
        """key -> how many of the text's distinct n-grams appear in the index under that key."""
        return Counter(self.owner[h] for h in ngram_hashes(text, self.n).tolist() if h in self.owner)

    def __len__(self) -> int:
        return len(self.owner)


def record_texts(record: dict) -> list[str]:
    """The texts a JSON record could leak as: its scalar strings joined (question, context), and that
    joined with each item of each list of strings (a multiple-choice option, a reference answer)."""
    base, options = [], []
    for value in record.values():
        if isinstance(value, str):
            base.append(value)
        elif isinstance(value, list):
            options += [v for v in value if isinstance(v, str)]
        elif isinstance(value, dict):
            base += record_texts(value)[:1]
    joined = " ".join(base)
    return [joined] + [f"{joined} {option}" for option in options]


def index_eval_sets(paths: Iterable[str | Path], n: int = 13) -> NgramIndex:
    """Index every JSONL record under the paths, keyed by its file's stem (hellaswag_val_dev, ...).

    Texts shorter than n words add nothing (a 13-gram test cannot see them).
    """
    index = NgramIndex(n)
    for path in paths:
        path = Path(path)
        for file in sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]:
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        for text in record_texts(json.loads(line)):
                            index.add(text, file.stem)
    return index
