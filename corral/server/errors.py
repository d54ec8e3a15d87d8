"""Exceptions -> HTTP answers, in the shape of the API that was called.

The route prefix picks the dialect: ``/v1/...`` answers OpenAI's
``{"error": {"message", "type", "param", "code"}}``, everything else (``/api/...`` for Ollama,
the chat page) answers ``{"error": "..."}``. Routers raise typed errors (``corral.errors``, the
engine's RequestError, ``HTTPError`` below) and never build error bodies by hand, so one table
decides every status code:

    ModelNotFoundError -> 404   QueueFullError -> 503   RequestError, ContextLengthError,
    SamplingError, ChatFormatError, ConfigError, InvalidNameError, other CorralError -> 400
    HTTPError -> its own status  a full disk (ENOSPC, EDQUOT, SQLITE_FULL, or caused by one) -> 507
    anything else -> 500 (message kept generic, traceback logged)
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.errors import CorralError, ModelNotFoundError

log = logging.getLogger("corral.server")

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                408: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error", 507: "server_error"}


class HTTPError(CorralError):
    """A request error with an explicit status. ``param`` names the offending field(s), ``code`` is a short
    machine-readable reason (OpenAI's ``code``: "model_not_found", "invalid_api_key", "context_length_exceeded")."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.param, self.code = param, code


class BadRequest(HTTPError):
    """400: a body or parameter that cannot be used. ``params`` lists every bad field, in order."""

    def __init__(self, problems: list[tuple[str, str]] | str, *, param: str | None = None, code: str | None = None):
        if isinstance(problems, str):
            problems = [(param or "", problems)]
        self.problems = problems
        names = [name for name, _ in problems if name]
        super().__init__("; ".join(msg for _, msg in problems), status=400,
                         param=param or (", ".join(dict.fromkeys(names)) or None), code=code)


class ModelLoadError(HTTPError):
    """500: a stored model exists but cannot be loaded (corrupt blob, out of memory)."""

    status = 500


SQLITE_FULL = 13
NO_SPACE = "no space left on the server's disk; free some space and try again"


def disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT from a write, or SQLite's "database or disk is full", here or in what caused it."""
    for _ in range(8):  # the chain of causes, bounded
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.OperationalError) and (
                getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def status_of(exc: BaseException) -> int:
    """The HTTP status for an exception (the table in the module docstring)."""
    from corral.engine.scheduler import QueueFullError

    if disk_full(exc):
        return 507
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, QueueFullError):
        return 503
    if isinstance(exc, CorralError):
        return 400
    return 500


def _code_of(exc: BaseException, status: int) -> str | None:
    from corral.engine.engine import ContextLengthError

    if isinstance(exc, HTTPError):
        return exc.code
    if isinstance(exc, ContextLengthError):
        return "context_length_exceeded"
    return {404: "model_not_found", 503: "server_overloaded", 413: "request_too_large",
            507: "insufficient_storage"}.get(status)


def message_of(exc: BaseException, status: int) -> str:
    # A 500's text could leak paths or internals; the full traceback goes to the log instead.
    if status == 507:
        return NO_SPACE
    return str(exc) if status < 500 or isinstance(exc, CorralError) else f"internal error ({type(exc).__name__})"


def dialect_of(path: str) -> str:
    return "openai" if path == "/v1" or path.startswith("/v1/") else "ollama"


def openai_error(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": OPENAI_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_body(exc: BaseException, dialect: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for exc in the dialect "openai" or "ollama"."""
    status = status_of(exc)
    message = message_of(exc, status)
    if dialect == "openai":
        return status, openai_error(message, status, param=getattr(exc, "param", None), code=_code_of(exc, status))
    return status, {"error": message}


def error_response(path: str, exc: BaseException) -> JSONResponse:
    status, body = error_body(exc, dialect_of(path))
    if status == 507:
        log.warning("no space left on device answering %s: %s", path, exc)
    elif status >= 500 and not isinstance(exc, CorralError):
        log.error("error answering %s", path, exc_info=exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def sse_error_frame(exc: BaseException) -> str:
    """The OpenAI error event sent mid-stream, before ``data: [DONE]`` (RELIABILITY 24)."""
    _, body = error_body(exc, "openai")
    return f"data: {json.dumps(body)}\n\n"


def _validation_problems(exc: RequestValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        name = ".".join(loc)
        out.append((name, f"{name or 'body'}: {err.get('msg', 'invalid')}"))
    return out


def install_handlers(app: FastAPI) -> None:
    """Every error leaves the app through error_response, in the dialect of the route."""

    @app.exception_handler(CorralError)
    async def _corral(request: Request, exc: CorralError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, BadRequest(_validation_problems(exc) or "invalid request body"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 404 (no such route) and 405 (wrong method), in the caller's dialect.
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return error_response(request.url.path, HTTPError(detail, status=exc.status_code))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, exc)


class AnswerUnexpectedErrors:
    """The innermost middleware: an unexpected exception becomes error_response here, before Starlette's
    outer error middleware, which answers 500 and then re-raises, so uvicorn closes the keep-alive connection
    and a client's next request on it fails with a reset (3 in 3,000 valid requests in a soak). A response that
    has already started cannot be replaced: that error still propagates."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            await error_response(scope["path"], exc)(scope, receive, send)
