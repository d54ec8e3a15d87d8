"""The FastAPI app: dialect routers, /health, /metrics, and the gate in front of them.

    request -> CountRequests (metrics) -> Guard (Host, API key, body size) -> FastAPI routing
            -> openai.router (/v1/...), ollama.router (/api/...), web.router (/, /corral/...)

Routers written by other parts of the project are included when their module exists (the server
runs without the Ollama dialect or the chat page, never with a half-imported one).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from corral.server import openai, responses
from corral.server.errors import install_handlers
from corral.server.security import Guard
from corral.server.state import ServerState

OPTIONAL_ROUTERS = ("corral.server.ollama", "corral.server.web")


class CountRequests:
    """Counts every answer by route template and status (after the Guard, so 401/403/413 count too)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.state.metrics.count_request(getattr(route, "path", None) or "unmatched", status)


class RequestId:
    """Every answer carries ``x-request-id`` (the OpenAI SDK shows it as ``_request_id``): the client's own
    when it sent a short printable one, else a fresh one, so a log line and a client report can be matched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        rid = given if 0 < len(given) <= 128 and given.isascii() and given.decode().isprintable() \
            else f"req_{secrets.token_hex(12)}".encode()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, sending)


async def preload(state: ServerState) -> None:
    """`corral serve --model NAME|PATH`: load at start; the first one becomes the default model."""
    for i, name in enumerate(state.config.preload):
        key = state.pool.register_path(name) if Path(name).exists() and name not in state.pool.paths else name
        model = await state.pool.get(key)
        state.pool.release(model)
        if i == 0:
            state.pool.default_model = model.name


def build_app(state: ServerState, optional_routers: tuple[str, ...] = OPTIONAL_ROUTERS) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await preload(state)
        expiry = asyncio.create_task(state.pool.run_expiry())
        try:
            yield
        finally:
            expiry.cancel()
            state.pool.close()

    app = FastAPI(title="Corral", summary="OpenAI- and Ollama-compatible Llama server", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.corral = state
    install_handlers(app)
    app.include_router(openai.router)
    app.include_router(responses.router)
    for name in optional_routers:
        if importlib.util.find_spec(name) is not None:
            app.include_router(importlib.import_module(name).router)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        text = state.metrics.render(state.pool)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(Guard, config=state.config)
    app.add_middleware(CountRequests, state=state)
    app.add_middleware(RequestId)  # added last = outermost: errors from the Guard carry the id too
    return app
