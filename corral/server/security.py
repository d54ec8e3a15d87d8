"""The gate in front of every route: Host check, Origin check, API key, content type, body size. A pure
ASGI middleware, so it never buffers a streamed answer.

1. Host (RELIABILITY 18): on a loopback-bound server, a request whose Host header is not
   localhost, 127.x.x.x or [::1] (any port) gets 403. That is a DNS-rebinding page in a browser:
   its own domain resolved to 127.0.0.1, so the browser sends that domain as Host. The header is
   parsed whole (``[::1].evil.com`` and ``127.0.0.1:1@evil.com`` are not loopback; issue 14 item 5).
2. Origin (RELIABILITY 38): a browser names the page that sent a request in ``Origin``. A request
   whose Origin is neither this server (same host and port as ``Host``) nor in ``--allow-origin`` /
   CORRAL_ORIGINS gets 403, so a page on another site cannot copy, push or import through a
   ``no-cors`` POST. Requests without Origin (curl, SDKs) are not browsers' and pass. CORS
   preflights (OPTIONS) are answered for allowed origins only; their answers carry
   ``Access-Control-Allow-Origin``.
3. Content type: a body sent to a route that reads JSON must say ``application/json`` (or
   ``...+json``); ``text/plain`` and ``multipart/form-data``, the types a page may send without a
   preflight, get 415. A form-encoded body passes only from a non-browser (``curl -d`` sends that
   type). Blob uploads are bytes (any type).
4. API key (RELIABILITY 17): with a key set (CORRAL_API_KEY or --api-key), every route but
   /health, the chat page and its static files needs ``Authorization: Bearer <key>``; missing or
   wrong -> 401 in the dialect's error shape.
5. Body size: Content-Length over the limit -> 413 before a byte is read; a chunked body is
   counted as it arrives and the read fails with 413 once it passes the limit.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import re
import sys

from fastapi.responses import JSONResponse, Response

from corral.server.errors import HTTPError, dialect_of, error_body
from corral.server.state import ServeConfig, is_loopback_host

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/corral/static/",)
BODY_LIMITS = {"/corral/api/import": 64 << 20}
"""Routes allowed more than the server's max_body_bytes (the chat page's conversation import)."""
UNLIMITED_BODY = 1 << 62


def body_limit(path: str, default: int) -> int:
    """Blob uploads stream to disk and are hashed on the way (a model is gigabytes); the rest get a limit."""
    if path.startswith("/api/blobs/") or (path.startswith("/v2/") and path.endswith("/blobs/uploads/")):
        return UNLIMITED_BODY
    return BODY_LIMITS.get(path, default)


class BodyTooLarge(HTTPError):
    status = 413

    def __init__(self, limit: int):
        super().__init__(f"request body is over the limit of {limit} bytes", code="request_too_large")


_AUTHORITY = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SIMPLE_TYPES = ("text/plain", "multipart/form-data", "application/x-www-form-urlencoded")
"""Content types a page may POST to another origin without a CORS preflight."""
PREFLIGHT_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def parse_authority(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` or ``[v6][:port]`` -> (lower-case host, port); None for anything else (``a@b``, ``[::1].x``)."""
    m = _AUTHORITY.fullmatch(text.strip())
    if m is None:
        return None
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        return None
    if m["v6"]:
        try:
            return str(ipaddress.IPv6Address(m["v6"])), port
        except ValueError:
            return None
    return m["name"].lower().rstrip("."), port


def host_allowed(host_header: str | None) -> bool:
    """localhost / 127.x / ::1 with any port; a missing header is allowed (no browser omits it)."""
    if host_header is None:
        return True
    parsed = parse_authority(host_header)
    return parsed is not None and is_loopback_host(parsed[0])


def origin_allowed(origin: str, host_header: str | None, allowed: tuple[str, ...] | list[str]) -> bool:
    """Same scheme-less host and port as the Host header, or a match of an --allow-origin pattern ("*" wildcards)."""
    origin = origin.strip().lower()
    if any(fnmatch.fnmatchcase(origin, pattern.strip().lower()) for pattern in allowed):
        return True
    scheme, sep, netloc = origin.partition("://")
    if not sep or scheme not in ("http", "https") or host_header is None:
        return False
    default = 443 if scheme == "https" else 80
    theirs, ours = parse_authority(netloc), parse_authority(host_header)
    if theirs is None or ours is None:
        return False
    return theirs[0] == ours[0] and (theirs[1] or default) == (ours[1] or default)


def reads_json(path: str) -> bool:
    """Routes whose body is JSON (every one but the blob uploads, which are raw bytes)."""
    return not (path.startswith("/api/blobs/") or (path.startswith("/v2/") and "/blobs/" in path))


def content_type_refusal(method: str, path: str, headers: dict[str, str]) -> HTTPError | None:
    """415 for a JSON route's body sent as text/plain or a form (what a page can send without a preflight)."""
    if method not in STATE_CHANGING or not reads_json(path):
        return None
    has_body = headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers
    kind = headers.get("content-type", "").partition(";")[0].strip().lower()
    if not has_body or kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return None
    browser = "origin" in headers or "sec-fetch-mode" in headers or "sec-fetch-site" in headers
    if kind in ("", "application/x-www-form-urlencoded") and not browser:
        return None  # curl -d sends a form type; a non-browser client cannot be forged by a page
    return HTTPError(f"Content-Type must be application/json for {path}, got {kind or 'none'!r}", status=415,
                     code="unsupported_media_type")


def bearer_matches(authorization: str | None, key: str) -> bool:
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def warn_if_exposed(config: ServeConfig) -> None:
    """RELIABILITY 17: binding beyond loopback without a key is loud."""
    if config.loopback or config.api_key:
        return
    bar = "!" * 78
    print(f"{bar}\n!! WARNING: corral serve is listening on {config.host}:{config.port} WITHOUT an API key.\n"
          "!! Anyone who can reach this address can run your models and read your chat history.\n"
          "!! Set CORRAL_API_KEY or pass --api-key, or bind 127.0.0.1.\n"
          f"{bar}", file=sys.stderr, flush=True)


class Guard:
    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        refusal = self._refusal(method, path, headers)
        if refusal is None and method == "OPTIONS":
            return await Response(status_code=204, headers=self._preflight(headers))(scope, receive, send)
        if refusal is not None:
            status, body = error_body(refusal, dialect_of(path))
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse(body, status_code=status, headers=extra)(scope, receive, send)
        limit = body_limit(path, self.config.max_body_bytes)
        origin = headers.get("origin")
        await self.app(scope, _limited(receive, limit), _with_cors(send, origin) if origin else send)

    def _preflight(self, headers: dict[str, str]) -> dict[str, str]:
        """A CORS preflight from an allowed origin (a plain OPTIONS without Origin just lists the methods)."""
        out = {"Allow": PREFLIGHT_METHODS}
        if "origin" in headers:
            out.update({"Access-Control-Allow-Origin": headers["origin"], "Vary": "Origin",
                        "Access-Control-Allow-Methods": PREFLIGHT_METHODS, "Access-Control-Max-Age": "600",
                        "Access-Control-Allow-Headers": headers.get("access-control-request-headers",
                                                                    "authorization, content-type")})
        return out

    def _refusal(self, method: str, path: str, headers: dict[str, str]) -> HTTPError | None:
        if self.config.loopback and not host_allowed(headers.get("host")):
            return HTTPError(f"Host {headers.get('host')!r} is not allowed on a server bound to loopback "
                             "(DNS rebinding protection); use localhost or 127.0.0.1", status=403,
                             code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, headers.get("host"), self.config.allow_origins):
            return HTTPError(f"Origin {origin[:100]!r} is not allowed (cross-site request protection); "
                             "start the server with --allow-origin or CORRAL_ORIGINS to allow it", status=403,
                             code="origin_not_allowed")
        if method == "OPTIONS":
            return None  # a preflight carries no credentials; its answer allows nothing by itself
        key = self.config.api_key
        if key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            if not bearer_matches(headers.get("authorization"), key):
                return HTTPError("missing or wrong API key (send Authorization: Bearer <key>)", status=401,
                                 code="invalid_api_key")
        refusal = content_type_refusal(method, path, headers)
        if refusal is not None:
            return refusal
        length = headers.get("content-length")
        limit = body_limit(path, self.config.max_body_bytes)
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            return BodyTooLarge(limit)
        return None


def _with_cors(send, origin: str):
    """Let the allowed page that sent the request read the answer (the Origin was checked before)."""

    async def sending(message) -> None:
        if message["type"] == "http.response.start":
            extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


def _limited(receive, limit: int):
    """receive() that counts body bytes and raises BodyTooLarge past the limit (chunked uploads)."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped
