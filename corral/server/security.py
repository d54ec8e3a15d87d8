"""The gate in front of every route: Host check, API key, body size. A pure ASGI middleware, so it
never buffers a streamed answer.

1. Host (RELIABILITY 18): on a loopback-bound server, a request whose Host header is not
   localhost, 127.x.x.x or [::1] (any port) gets 403. That is a DNS-rebinding page in a browser:
   its own domain resolved to 127.0.0.1, so the browser sends that domain as Host.
2. API key (RELIABILITY 17): with a key set (CORRAL_API_KEY or --api-key), every route but
   /health, the chat page and its static files needs ``Authorization: Bearer <key>``; missing or
   wrong -> 401 in the dialect's error shape.
3. Body size: Content-Length over the limit -> 413 before a byte is read; a chunked body is
   counted as it arrives and the read fails with 413 once it passes the limit.
"""

from __future__ import annotations

import hmac
import sys

from fastapi.responses import JSONResponse

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


def host_allowed(host_header: str | None) -> bool:
    """localhost / 127.x / ::1 with any port; a missing header is allowed (no browser omits it)."""
    if host_header is None:
        return True
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback_host(host)


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
        path = scope.get("path", "")
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        refusal = self._refusal(path, headers)
        if refusal is not None:
            status, body = error_body(refusal, dialect_of(path))
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse(body, status_code=status, headers=extra)(scope, receive, send)
        limit = body_limit(path, self.config.max_body_bytes)
        await self.app(scope, _limited(receive, limit), send)

    def _refusal(self, path: str, headers: dict[str, str]) -> HTTPError | None:
        if self.config.loopback and not host_allowed(headers.get("host")):
            return HTTPError(f"Host {headers.get('host')!r} is not allowed on a server bound to loopback "
                             "(DNS rebinding protection); use localhost or 127.0.0.1", status=403,
                             code="host_not_allowed")
        key = self.config.api_key
        if key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            if not bearer_matches(headers.get("authorization"), key):
                return HTTPError("missing or wrong API key (send Authorization: Bearer <key>)", status=401,
                                 code="invalid_api_key")
        length = headers.get("content-length")
        limit = body_limit(path, self.config.max_body_bytes)
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            return BodyTooLarge(limit)
        return None


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
