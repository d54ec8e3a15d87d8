"""What every Ollama route reads and writes: JSON bodies and their fields, times, NDJSON status streams.

Status streams (/api/pull, /api/push, /api/create) are lines like ``{"status": "pulling manifest"}``,
``{"status": "pulling 1a2b3c4d5e6f", "digest": "sha256:...", "total": N, "completed": M}`` and a last
``{"status": "success"}``; a failure is a last ``{"error": "..."}`` line. With ``"stream": false``
the answer is the one ``{"status": "success"}`` object, or the error's status code and body.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.server.errors import BadRequest, error_body
from corral.server.schemas import is_function_tool, parse_json

NDJSON = "application/x-ndjson"
Report = Callable[[dict], None]
"""Called (from a worker thread) with each status line."""


STRING, BOOL, OBJECT, LIST = (str,), (bool,), (dict,), (list,)
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    **{k: (STRING, "a string") for k in ("model", "name", "prompt", "suffix", "system", "template", "source",
                                          "destination", "from", "modelfile", "quantize")},
    **{k: (BOOL, "true or false") for k in ("stream", "raw", "insecure", "verbose", "truncate")},
    **{k: (OBJECT, "an object") for k in ("options", "parameters", "files", "adapters")},
    **{k: (LIST, "a list") for k in ("messages", "tools", "context", "images")},
    "format": ((str, dict), '"json" or a JSON schema object'), "input": ((str, list), "a string or a list of strings"),
    "license": ((str, list), "a string or a list of strings"), "keep_alive": ((str, int, float), "a duration"),
    "dimensions": ((int,), "an integer"),
}
"""Every field any Ollama route reads, with the JSON types it may hold (null = absent). Checked for every
route before it reads anything, so a wrong type is one 400 naming the field, never a 500 (RELIABILITY 43)."""
MESSAGE_TYPES = {"role": STRING, "content": STRING, "tool_calls": LIST, "images": LIST, "tool_name": STRING,
                 "name": STRING, "tool_call_id": STRING, "thinking": STRING}


async def read_body(request: Request) -> dict:
    """The JSON object body with its fields' types checked; 400 for malformed JSON, a top-level array
    (RELIABILITY 21) or any field of the wrong type (issue 14 item 11)."""
    body = parse_json(await request.body())
    check_types(body)
    return body


def check_types(body: dict) -> None:
    problems = []
    for name, value in body.items():
        kinds, rule = FIELD_TYPES.get(name, ((object,), ""))
        if value is not None and not (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))):
            problems.append((name, f"{name} must be {rule}, got {_kind(value)}"))
    problems += _item_problems(body)
    if problems:
        raise BadRequest(problems)


def _item_problems(body: dict) -> list[tuple[str, str]]:
    """Messages are objects of typed fields; tools are function definitions."""
    problems = []
    for i, m in enumerate(body.get("messages") or [] if isinstance(body.get("messages"), list) else []):
        bad = [k for k, kinds in MESSAGE_TYPES.items() if isinstance(m, dict) and m.get(k) is not None
               and not isinstance(m[k], kinds)]
        if not isinstance(m, dict) or bad:
            where = f"messages[{i}]" + (f".{bad[0]}" if bad else "")
            problems.append(("messages", f"{where} must be {'an object' if not bad else _RULES[bad[0]]}"))
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if not is_function_tool(tool):
            problems.append(("tools", f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                                      '"parameters": {...}}}'))
    return problems[:8]


_RULES = {"tool_calls": "a list", "images": "a list"}
_RULES.update({k: "a string" for k in MESSAGE_TYPES if k not in _RULES})


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest([(name, f"{name} must be true or false, got {json.dumps(value)[:40]}")])
    return value


def text_field(body: dict, name: str) -> str:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest([(name, f"{name} must be a string")])
    return value or ""


def name_field(body: dict, *names: str) -> str:
    """The first of `names` that holds a non-empty string (Ollama renamed "name" to "model")."""
    for key in names:
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    raise BadRequest([(names[0], f"{names[0]} is required (a model name)")])


def iso(unix: float | None) -> str | None:
    """Unix time -> RFC 3339 in UTC; None stays None (a model kept loaded forever has no expiry)."""
    if unix is None:
        return None
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def ns(seconds: float | None) -> int:
    """Seconds -> Ollama's nanoseconds, at least 1 for anything that ran."""
    return max(1, int((seconds or 0.0) * 1e9))


def line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


async def _status_lines(work: Callable[[Report], None]) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()

    def report(status: dict | None) -> None:
        loop.call_soon_threadsafe(lines.put_nowait, status)

    def run() -> None:
        try:
            work(report)
            report({"status": "success"})
        except Exception as exc:  # noqa: BLE001 - every failure becomes the stream's last line
            report(error_body(exc, "ollama")[1])
        finally:
            report(None)

    worker = loop.run_in_executor(None, run)
    while (status := await lines.get()) is not None:
        yield line(status)
    await worker


async def progress_response(work: Callable[[Report], None], stream: bool) -> Response:
    """Run `work(report)` in a worker thread; NDJSON status lines, or one {"status": "success"}."""
    if stream:
        return StreamingResponse(_status_lines(work), media_type=NDJSON)
    await asyncio.to_thread(work, lambda status: None)  # errors propagate to the app's handlers
    return JSONResponse({"status": "success"})


def no_images(images: Any, where: str = "images") -> None:
    if images:
        raise BadRequest([(where, "images are not supported: Corral serves text-only models")])
