"""HTML -> text for WARC pages, by resiliparse (chosen over trafilatura: docs/curation.md has the measurement).

Two guards run before the parser sees a page, because resiliparse's main-content pass is quadratic in
the tree depth (10,000 nested <div>s take 4 s, 100,000 did not finish in minutes) and a page can be any
size: a page over ``max_bytes`` is "html_too_large", a page nested deeper than ``max_depth`` is
"html_too_deep". 512 is the depth at which browsers' HTML parsers stop nesting (Chromium's
kMaximumHTMLParserDOMTreeDepth), so no page a browser renders as intended is lost.
"""

from __future__ import annotations

import re

# Elements that never hold children, so they never deepen the tree (HTML Living Standard, void elements).
_VOID = frozenset(b"area base br col embed hr img input link meta param source track wbr".split())
_TAG = re.compile(rb"<(/?)([a-zA-Z][a-zA-Z0-9]{0,15})[^>]*?(/?)>")


def html_depth(page: bytes, limit: int) -> int:
    """The deepest element nesting in the page, counted from tags alone; stops once it passes ``limit``."""
    depth = deepest = 0
    for match in _TAG.finditer(page):
        closing, name, self_closing = match.groups()
        if name.lower() in _VOID or self_closing:
            continue
        depth = max(depth - 1, 0) if closing else depth + 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def extract_text(page: bytes, *, max_bytes: int = 5_000_000, max_depth: int = 512) -> tuple[str | None, str]:
    """(main text, "") for a page, or (None, reason) when a guard or the decoder refuses it."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    if len(page) > max_bytes:
        return None, "html_too_large"
    if html_depth(page, max_depth) > max_depth:
        return None, "html_too_deep"
    html = bytes_to_str(page, detect_encoding(page))
    text = extract_plain_text(html, main_content=True, alt_texts=False, links=False)
    if not text.strip():
        return None, "html_no_text"
    return text, ""
