"""Word and URL lists, a word-list NSFW score and PII masking.

The lists ship in corral/data/resources (README there: sources and licences): LDNOOBW (C4's bad-word
list, CC BY 4.0) and RefinedWeb's adult-URL lists as datatrove packages them (Apache-2.0). The NSFW score
is word-list based, not a model: bad-word hits per word. PII masking follows FineWeb's choice of
replacing emails and public IP addresses (Penedo et al. 2024, section 3) and adds phone numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from corral.data.documents import Document, Filter, Step

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@cache
def word_list(name: str) -> tuple[str, ...]:
    """A list from corral/data/resources, or any file path: one entry a line, lower-cased, blanks skipped."""
    path = Path(name)
    text = (path.read_text(encoding="utf-8") if path.is_file()
            else resources.files("corral.data").joinpath("resources", name).read_text(encoding="utf-8"))
    return tuple(sorted({line.strip().lower() for line in text.splitlines() if line.strip()}))


@dataclass
class UrlFilterConfig:
    banned_words: str = "refinedweb_url_banned_words.txt"
    """A URL token (split on non-alphanumerics) in this list drops the document."""
    banned_subwords: str = "refinedweb_url_banned_subwords.txt"
    """An entry found anywhere in the URL with separators removed drops it."""
    soft_banned_words: str = "refinedweb_url_soft_banned_words.txt"
    soft_threshold: int = 2
    """This many soft-banned URL tokens drop it (RefinedWeb's rule)."""
    url_key: str = "url"


class UrlFilter(Filter):
    name = "url_filter"

    def __init__(self, config: UrlFilterConfig | None = None):
        super().__init__()
        self.c = c = config or UrlFilterConfig()
        self.banned = frozenset(word_list(c.banned_words))
        self.soft = frozenset(word_list(c.soft_banned_words))
        subwords = sorted({_NON_ALNUM.sub("", w) for w in word_list(c.banned_subwords)} - {""})
        self.subwords = re.compile("|".join(map(re.escape, subwords))) if subwords else None

    def keep(self, doc: Document) -> tuple[bool, str]:
        url = str(doc.metadata.get(self.c.url_key) or "").lower()
        if not url:
            return True, ""
        parts = urlsplit(url)
        tokens = [t for t in _NON_ALNUM.split(parts.netloc + " " + parts.path + " " + parts.query) if t]
        if self.banned.intersection(tokens):
            return False, "url_banned_word"
        if self.subwords is not None and self.subwords.search(_NON_ALNUM.sub("", url)):
            return False, "url_banned_subword"
        if sum(t in self.soft for t in tokens) >= self.c.soft_threshold:
            return False, "url_soft_banned"
        return True, ""


@dataclass
class BadWordsConfig:
    words: str = "ldnoobw_naughty_words_en.txt"
    max_score: float = 0.0
    """NSFW score = bad-word hits per word; above this drops. 0.0 is C4's rule: any hit drops the page."""


class BadWords(Filter):
    """LDNOOBW hits as whole words or phrases (case-insensitive); the score goes to metadata["nsfw_score"]."""

    name = "bad_words"

    def __init__(self, config: BadWordsConfig | None = None):
        super().__init__()
        self.c = config or BadWordsConfig()
        words = sorted(word_list(self.c.words), key=len, reverse=True)  # longest phrase first
        self.pattern = re.compile(r"(?<![\w])(?:" + "|".join(map(re.escape, words)) + r")(?![\w])", re.IGNORECASE)

    def score(self, text: str) -> float:
        return len(self.pattern.findall(text)) / max(len(text.split()), 1)

    def keep(self, doc: Document) -> tuple[bool, str]:
        score = self.score(doc.text)
        doc.metadata["nsfw_score"] = round(score, 6)
        if score > self.c.max_score:
            return False, "nsfw_words"
        return True, ""


# Patterns: an email (RFC 5322's common subset), an IPv4 address with octets 0-255, and a phone number
# of 10-15 digits with the usual separators (E.164 allows at most 15 digits).
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PII_PATTERNS = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "ip": re.compile(rf"(?<![\d.]){_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?![\d.])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w)"),
}


@dataclass
class PiiConfig:
    email: str = "<EMAIL>"
    """Replacement for an email address; empty keeps emails."""
    ip: str = "<IP>"
    phone: str = "<PHONE>"


class PiiMask(Step):
    """Replaces emails, IPv4 addresses and phone numbers; counts documents changed per kind."""

    name = "pii"

    def __init__(self, config: PiiConfig | None = None):
        super().__init__()
        self.c = config or PiiConfig()

    def mask(self, text: str) -> tuple[str, list[str]]:
        kinds = []
        for kind in ("email", "ip", "phone"):  # emails first: their digits must not read as phones
            replacement = getattr(self.c, kind)
            if replacement:
                text, n = PII_PATTERNS[kind].subn(replacement, text)
                if n:
                    kinds.append(kind)
        return text, kinds

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for doc in self.count(docs):
            doc.text, kinds = self.mask(doc.text)
            for kind in kinds:
                self.stats.changed[f"masked_{kind}"] += 1
            yield doc
