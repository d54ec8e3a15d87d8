"""The FastAPI app: dialect routers, /health, /metrics, and the gate in front of them.

    request -> CountRequests (metrics) -> Guard (Host, API key, body size) -> FastAPI routing
            -> openai.router (/v1/...), ollama.router (/api/...), web.router (/, /corral/...)

ROUTERS is the table of them; `build_app(state, routers=...)` serves a subset (tests start servers
without the chat page or the Ollama dialect).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from corral.server import moderation, ollama, openai, responses, web
from corral.server.errors import AnswerUnexpectedErrors, install_handlers
from corral.server.security import Guard
from corral.server.state import ServerState

ROUTERS = {"openai": openai.router, "responses": responses.router, "ollama": ollama.router, "web": web.router,
           "moderation": moderation.router}


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
    """`corral serve --model NAME|PATH`: load at start; the first one becomes the default model.
    `--guard`: the guard is loaded first and put in front of every generation."""
    if state.config.guard is not None and state.guard is None:
        await asyncio.to_thread(moderation.install_guard, state)
    for i, name in enumerate(state.config.preload):
        key = state.pool.register_path(name) if Path(name).exists() and name not in state.pool.paths else name
        model = await state.pool.get(key)
        state.pool.release(model)
        if i == 0:
            state.pool.default_model = model.name


def build_app(state: ServerState, routers: tuple[str, ...] = tuple(ROUTERS)) -> FastAPI:
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
    for name in routers:
        app.include_router(ROUTERS[name])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        text = state.metrics.render(state.pool)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(AnswerUnexpectedErrors)  # added first = innermost: a 500 keeps its connection
    app.add_middleware(Guard, config=state.config)
    app.add_middleware(CountRequests, state=state)
    app.add_middleware(RequestId)  # added last = outermost: errors from the Guard carry the id too
    return app
