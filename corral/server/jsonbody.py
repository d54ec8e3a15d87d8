"""Request bodies -> JSON objects every later step can store, render and send back (RELIABILITY 43).

``parse_json`` is the one door for JSON bodies on every route (/v1, /api, /corral/api). Besides
"is it JSON" it refuses two things json.loads lets through and that fail later, as 500s:

- nesting deeper than MAX_DEPTH: 10,000 levels overflow the stack while decoding, and 900 levels
  decode but break whatever walks the value later (a stored chat ``stats`` then made every GET of
  that conversation a 500);
- lone surrogates (``"\\ud800"``): valid JSON escapes, but not text; the first UTF-8 encode
  (SQLite, the tokenizer, the answer) fails.

Both are found by one walk over the decoded value, done only when cheap byte counts say it could
matter, so a plain 8 MB chat pays two scans of its bytes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from corral.server.errors import BadRequest

MAX_DEPTH = 64
"""Objects and arrays inside each other; JSON schemas and tool definitions stay far below it."""
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(raw: bytes) -> dict:
    """The JSON object in `raw`; BadRequest (400) naming the problem, and the field where there is one."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"request body is nested deeper than {MAX_DEPTH} levels", param="body") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", param="body") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_kind(body)}", param="body")
    deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    if deep or _SURROGATE_ESCAPE.search(raw):
        check_value(body, surrogates=not deep or _SURROGATE_ESCAPE.search(raw) is not None)
    return body


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def check_value(value: Any, *, surrogates: bool = True, max_depth: int = MAX_DEPTH) -> None:
    """BadRequest naming the first field nested deeper than max_depth or (with surrogates) holding a lone one."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if surrogates and _SURROGATE.search(item):
                name = path or "body"
                raise BadRequest([(name, f"{name} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")])
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= max_depth:
            name = _top(path) or "body"
            raise BadRequest([(name, f"{name} is nested deeper than {max_depth} levels")])
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if surrogates and isinstance(key, str) and _SURROGATE.search(key):
                raise BadRequest([(path or "body", f"{path or 'body'} has a key with a lone UTF-16 surrogate")])
            child_path = f"{path}[{key}]" if isinstance(item, list) else (f"{path}.{key}" if path else str(key))
            stack.append((child, child_path, depth + 1))


def _top(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]
