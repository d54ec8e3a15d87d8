"""Code Shield on hostile input: binary, 10 MB, one endless line, and text built to make regexes
backtrack (every rule's own keywords, unclosed comments and strings) all finish in bounded time, and
no text at all makes the scanner raise."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.safety.code_rules import default_rules
from corral.safety.code_scan import MAX_CHARS, scan, scan_reply
from corral.safety.code_text import LANGUAGES

TEN_MB = 10 * 1024 * 1024
LIMIT_S = 8.0  # measured ~0.3-0.6 s per language on a loaded 2-core machine; a backtracking regex takes minutes


def _soup() -> str:
    """Every identifier the rules look for, each opening a call: the worst case for rules that match."""
    words = sorted({w for rules in default_rules().values() for r in rules if r.regex
                    for w in re.findall(r"[A-Za-z_]{3,}", r.regex.pattern)})
    return " ".join(f'{w}(x, "{w}", ' for w in words)


HOSTILE = {
    "soup": lambda: (_soup() * (TEN_MB // len(_soup()) + 1))[:TEN_MB],
    "soup_lines": lambda: ((_soup() + "\n") * (TEN_MB // len(_soup()) + 1))[:TEN_MB],
    "one_line": lambda: "a" * TEN_MB,
    "newlines": lambda: "\n" * TEN_MB,
    "open_parens": lambda: "eval(" * (TEN_MB // 5),
    "unclosed": lambda: '/* "' + "`${'" * (TEN_MB // 5),
}


@pytest.mark.parametrize("language", [*LANGUAGES, None])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_ten_megabytes_bounded_time(language, kind):
    text = HOSTILE[kind]()
    started = time.perf_counter()
    result = scan(text, language)
    elapsed = time.perf_counter() - started
    assert elapsed < LIMIT_S * (3 if language is None else 1), f"{kind}/{language}: {elapsed:.1f} s"
    assert result.truncated and len(result.findings) <= 200 * 200


def test_binary_skipped_fast():
    blob = bytes(range(256)).decode("latin-1") * (TEN_MB // 256)
    started = time.perf_counter()
    result = scan(blob, "c")
    assert result.skipped and "binary" in result.skipped and result.findings == []
    assert time.perf_counter() - started < 1.0


def test_truncated_beyond_cap_still_finds_early_code():
    result = scan("gets(buf);\n" + "x = 1;\n" * (MAX_CHARS // 4), "c")
    assert result.truncated and [f.line for f in result.findings] == [1]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=400), language=st.sampled_from([*LANGUAGES, None]))
def test_any_text_scans_without_error(text, language):
    result = scan(text, language)
    lines = text.count("\n") + 1
    assert all(1 <= f.line <= lines for f in result.findings)
    scan_reply(f"```{language or ''}\n{text}\n```")
