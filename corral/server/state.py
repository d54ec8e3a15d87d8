"""What every route of the server shares: the model pool, the metrics, the settings and the store.

Routers reach it with ``get_state(request)``. The pool's names (ModelPool, LoadedModel,
ModelNotFound, parse_keep_alive) are re-exported here so the dialect routers import one module.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from corral.server.metrics import Metrics
from corral.server.pool import (
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MODEL,
    LoadedModel,
    LoadOptions,
    ModelNotFound,
    ModelPool,
    parse_keep_alive,
)

__all__ = ["DEFAULT_KEEP_ALIVE", "DEFAULT_MODEL", "LoadOptions", "LoadedModel", "ModelNotFound", "ModelPool",
           "ServeConfig", "ServerState", "get_state", "is_loopback_host", "parse_keep_alive"]

DEFAULT_BODY_LIMIT = 8 << 20  # 8 MiB: a long conversation is well under it; a runaway upload is not


@dataclass
class ServeConfig:
    """Settings of one server process (`corral serve` flags, CORRAL_* variables)."""

    host: str = "127.0.0.1"
    """Address bound; a loopback address turns the Host-header check on (DNS rebinding)."""
    port: int = 11435
    parallel: int = 4
    """Requests decoded together per model (KV cache slots)."""
    max_queue: int = 64
    """Requests waiting per model before new ones get 503."""
    max_loaded: int = 2
    """Models in memory at once; loading one more evicts the least recently used."""
    keep_alive: float = DEFAULT_KEEP_ALIVE
    """Seconds an idle model stays loaded (< 0 forever, 0 unload after each request)."""
    quant: str | None = None
    dtype: str | None = None
    context_length: int | None = None
    """Tokens per cache slot; None = the model's own context."""
    api_key: str | None = None
    """When set, every route but /health needs `Authorization: Bearer <key>`."""
    max_body_bytes: int = DEFAULT_BODY_LIMIT
    default_model: str = DEFAULT_MODEL
    preload: list[str] = field(default_factory=list)
    """Models loaded at start: store names or paths (a path is registered under its file name)."""
    allow_origins: list[str] = field(default_factory=list)
    """Browser origins besides the server's own that may call it ("http://localhost:*", "*" wildcards)."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's headers (slow-loris connections are closed)."""
    body_timeout: float = 30.0
    """Seconds a request body may go without a byte arriving (a body shorter than its Content-Length)."""
    keep_alive_timeout: float = 30.0
    """Seconds an idle keep-alive connection stays open between requests. Longer than clients' own pool expiry
    (httpx and so the openai SDK: 5 s): a server that closes first races a client reusing the connection, and the
    client sees a reset on a valid request (3 in 27,529 in a 30-minute soak at 5 s)."""
    max_connections: int = 1000
    """Open connections at once; more are answered 503 and closed (capped below the descriptor limit)."""
    code_shield: str | None = None
    """Code Shield on every answer's code blocks: "block" (insecure blocks replaced) or "warn"; None: off."""
    guard: str | None = None
    """`--guard`: "embedded" or a Llama Guard model (path or store name) checking input and output."""
    guard_fail_open: bool = False
    """Let text through when the guard fails (default: cut it)."""
    guard_threshold: float | None = None
    guard_exclude: list[str] = field(default_factory=list)

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)

    def load_options(self) -> LoadOptions:
        return LoadOptions(parallel=self.parallel, max_queue=self.max_queue, context_length=self.context_length,
                           quant=self.quant, dtype=self.dtype)

    @classmethod
    def from_env(cls, **overrides: Any) -> ServeConfig:
        """Defaults, then CORRAL_HOST / CORRAL_API_KEY, then explicit overrides (None = not given)."""
        config = cls()
        host = os.environ.get("CORRAL_HOST")
        if host:
            config.host, config.port = split_host_port(host, config.port)
        config.api_key = os.environ.get("CORRAL_API_KEY") or None
        config.allow_origins = [o.strip() for o in os.environ.get("CORRAL_ORIGINS", "").split(",") if o.strip()]
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        return config


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """ "127.0.0.1:11435", "[::1]:8080", "0.0.0.0", "http://host:port" -> (host, port)."""
    from corral.errors import ConfigError

    text = text.split("://", 1)[-1].rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"CORRAL_HOST port must be 1-65535, got {port!r}")
    return host or "127.0.0.1", int(port) if port else default_port


def is_loopback_host(host: str) -> bool:
    """localhost, 127.x.x.x and ::1 (brackets allowed)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerState:
    pool: ModelPool
    metrics: Metrics
    config: ServeConfig
    store: Any
    """corral.store.Store"""
    embedders: dict = field(default_factory=dict)
    """Embedding models outside the pool (the MiniLM sentence encoder), loaded on first use."""
    filters: list = field(default_factory=list)
    """Stream filters every generation passes through (corral.server.generation.StreamFilter), in order."""
    guard: Any = None
    """The corral.safety guard behind --guard and /v1/moderations (loaded at start or on first use)."""

    @classmethod
    def create(cls, config: ServeConfig, store=None) -> ServerState:
        from corral.store import Store

        store = store if store is not None else Store()
        pool = ModelPool(store, config.load_options(), max_loaded=config.max_loaded, keep_alive=config.keep_alive,
                         default_model=config.default_model)
        filters = []
        if config.code_shield:
            from corral.server.codeshield import CodeShieldFilter

            filters.append(CodeShieldFilter(config.code_shield))
        return cls(pool, Metrics(), config, store, filters=filters)


def get_state(request: Request) -> ServerState:
    """The server state behind a request (FastAPI dependency: ``Depends(get_state)``)."""
    return request.app.state.corral
