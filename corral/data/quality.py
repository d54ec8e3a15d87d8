"""Heuristic quality filters: Gopher quality and repetition, C4, FineWeb. Thresholds are the papers'.

Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
arXiv 2112.11446, appendix A.1.1 (quality) and table A1 (repetition). C4: Raffel et al. 2020, arXiv
1910.10683, section 2.2. FineWeb: Penedo et al. 2024, arXiv 2406.17557, section 3.4 (custom filters).
Words are whitespace-separated tokens, lines split on "\\n", paragraphs on blank lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from corral.data.documents import Document, Filter

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # Gopher's list
BULLETS = ("•", "●", "○", "▪", "◦", "-", "*", "‣", "⁃")
C4_END = (".", "?", "!", '"', "'")
TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", ":", ";")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_PARAGRAPHS = re.compile(r"\n{2,}")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_HAS_LETTER = re.compile(r"\S*[^\W\d_]\S*")  # a whitespace token holding a letter
_STOP_WORD = re.compile(r"(?<!\w)(?:" + "|".join(sorted(STOP_WORDS)) + r")(?!\w)")
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’…"


@dataclass
class GopherQualityConfig:
    min_words: int = 50
    """Fewer words than this is "gopher_short"."""
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    """'#' and '...' per word."""
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    """Fraction of words holding at least one letter."""
    min_stop_words: int = 2


class GopherQuality(Filter):
    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig | None = None):
        super().__init__()
        self.c = config or GopherQualityConfig()

    def keep(self, doc: Document) -> tuple[bool, str]:
        c, text = self.c, doc.text
        words = text.split()
        n = len(words)
        if n < c.min_words:
            return False, "gopher_short"
        if n > c.max_words:
            return False, "gopher_long"
        mean = sum(map(len, words)) / n
        if not c.min_mean_word_length <= mean <= c.max_mean_word_length:
            return False, "gopher_word_length"
        if (text.count("#") + text.count("...") + text.count("…")) / n > c.max_symbol_word_ratio:
            return False, "gopher_symbol_ratio"
        lines = [line for line in text.splitlines() if line.strip()] or [""]
        if sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > c.max_bullet_lines:
            return False, "gopher_bullet_lines"
        if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > c.max_ellipsis_lines:
            return False, "gopher_ellipsis_lines"
        if len(_HAS_LETTER.findall(text)) / n < c.min_alpha_words:
            return False, "gopher_non_alpha_words"
        if len(set(_STOP_WORD.findall(text.lower()))) < c.min_stop_words:
            return False, "gopher_stop_words"
        return True, ""


@dataclass
class GopherRepetitionConfig:
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    max_top_ngram_char_frac: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """For n = 2, 3, 4: the most frequent n-gram's share of characters (table A1: 0.20, 0.18, 0.16)."""
    max_dup_ngram_char_frac: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    """For n = 5..10: the share of characters inside repeated n-grams (0.15 down to 0.10)."""


def duplicated(items: list[str]) -> tuple[int, int]:
    """(elements that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class GopherRepetition(Filter):
    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig | None = None):
        super().__init__()
        self.c = config or GopherRepetitionConfig()

    def keep(self, doc: Document) -> tuple[bool, str]:
        c, text = self.c, doc.text
        total = len(text) or 1
        paragraphs = [p for p in _PARAGRAPHS.split(text.strip()) if p.strip()]
        n_dup, chars = duplicated(paragraphs)
        if paragraphs and n_dup / len(paragraphs) > c.max_dup_para_frac:
            return False, "dup_para_frac"
        if chars / total > c.max_dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = [line for line in text.split("\n") if line.strip()]
        n_dup, chars = duplicated(lines)
        if lines and n_dup / len(lines) > c.max_dup_line_frac:
            return False, "dup_line_frac"
        if chars / total > c.max_dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = text.split()
        if len(words) < 2:
            return True, ""
        vocab: dict[str, int] = {}
        ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64)  # (n_words,)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        word_chars = int(lengths.sum()) or 1
        for n, limit in zip((2, 3, 4), c.max_top_ngram_char_frac):
            if len(words) >= n:
                _, first, counts = np.unique(_ngram_hashes(ids, n), return_index=True, return_counts=True)
                top = int(np.argmax(counts))  # the most frequent n-gram (the earliest among ties)
                if counts[top] > 1 and lengths[first[top]:first[top] + n].sum() * counts[top] / word_chars > limit:
                    return False, f"top_{n}gram"
        for n, limit in zip(range(5, 11), c.max_dup_ngram_char_frac):
            if len(words) >= n and _repeated_ngram_chars(ids, lengths, n) / word_chars > limit:
                return False, f"dup_{n}gram"
        return True, ""


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every word n-gram (n_words - n + 1,); wraps mod 2^64."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + ids[j: len(ids) - n + 1 + j]
    return h


def _repeated_ngram_chars(ids: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of the words covered by an n-gram that already occurred earlier (each word counted once)."""
    h = _ngram_hashes(ids, n)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    repeats = np.flatnonzero(first[inverse] != np.arange(len(h)))  # starts of n-grams seen before
    if not len(repeats):
        return 0
    cover = np.zeros(len(ids) + 1, dtype=np.int64)  # +1 at each start, -1 n words later: cumsum > 0 is covered
    np.add.at(cover, repeats, 1)
    np.add.at(cover, repeats + n, -1)
    return int(lengths[np.cumsum(cover[:-1]) > 0].sum())


@dataclass
class C4Config:
    min_sentences: int = 3
    """Pages with fewer kept lines than this are dropped ("c4_too_few_sentences"; C4 section 2.2)."""
    min_words_per_line: int = 5
    max_word_length: int = 1000
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    drop_citations: bool = True


class C4(Filter):
    """C4's rules: keep only lines ending in terminal punctuation with enough words, then judge the page."""

    name = "c4"

    def __init__(self, config: C4Config | None = None):
        super().__init__()
        self.c = config or C4Config()

    def keep(self, doc: Document) -> tuple[bool, str]:
        c, lowered = self.c, doc.text.lower()
        if c.drop_lorem_ipsum and "lorem ipsum" in lowered:
            return False, "c4_lorem_ipsum"
        if c.drop_curly_bracket and "{" in doc.text:
            return False, "c4_curly_bracket"
        kept = []
        for line in doc.text.split("\n"):
            line = _CITATION.sub("", line).strip() if c.drop_citations else line.strip()
            words = line.split()
            if max(map(len, words), default=0) > c.max_word_length:
                return False, "c4_long_word"
            low = line.lower()
            if (not line.endswith(C4_END) or line.endswith("...") or len(words) < c.min_words_per_line
                    or (c.drop_javascript_lines and "javascript" in low)
                    or (c.drop_policy_lines and any(p in low for p in POLICY))):
                continue
            kept.append(line)
        if sum(len(_SENTENCE_END.findall(line)) for line in kept) < c.min_sentences:
            return False, "c4_too_few_sentences"
        new_text = "\n".join(kept)
        if new_text != doc.text:
            self.stats.changed["c4_lines_removed"] += 1
            doc.text = new_text
        return True, ""


@dataclass
class FineWebConfig:
    min_line_punct: float = 0.12
    """Fraction of lines ending in terminal punctuation; fewer is "fineweb_line_punct"."""
    max_short_lines: float = 0.67
    short_line_chars: int = 30
    max_dup_line_chars: float = 0.1
    """Characters in lines that repeat an earlier line, over all characters."""
    max_newline_per_word: float = 0.3


class FineWeb(Filter):
    name = "fineweb"

    def __init__(self, config: FineWebConfig | None = None):
        super().__init__()
        self.c = config or FineWebConfig()

    def keep(self, doc: Document) -> tuple[bool, str]:
        c = self.c
        lines = [line.strip() for line in doc.text.split("\n") if line.strip()]
        if not lines:
            return False, "fineweb_empty"
        if sum(line.endswith(TERMINAL) for line in lines) / len(lines) < c.min_line_punct:
            return False, "fineweb_line_punct"
        if sum(len(line) <= c.short_line_chars for line in lines) / len(lines) > c.max_short_lines:
            return False, "fineweb_short_lines"
        if duplicated(lines)[1] / max(sum(map(len, lines)), 1) >= c.max_dup_line_chars:
            return False, "fineweb_dup_line_chars"
        if doc.text.count("\n") / max(len(doc.text.split()), 1) > c.max_newline_per_word:
            return False, "fineweb_list_like"
        return True, ""
