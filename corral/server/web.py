"""The chat page: ``GET /``, its files under ``/corral/static/``, and a small REST API under ``/corral/api/``.

The page streams answers from ``/v1/chat/completions`` itself (fetch + SSE parsing in app.js) and
then saves the finished (or stopped) assistant message here with its stats, so the server's
OpenAI route stays stateless. Conversations live in ``conversations.ConversationStore``.

    GET    /corral/api/models                        [{name, context_length, loaded, default}]
    GET    /corral/api/conversations?q=TEXT          [conversation], newest first
    POST   /corral/api/conversations                 {title?, model?, system?, params?} -> conversation
    GET    /corral/api/conversations/{id}            conversation + messages (the tree) + path (root..leaf ids)
    PATCH  /corral/api/conversations/{id}            {title?, model?, system?, params?} -> conversation
    DELETE /corral/api/conversations/{id}            204
    POST   /corral/api/conversations/{id}/messages   {role, content, parent_id? (default leaf), stats?} -> tree
    POST   /corral/api/conversations/{id}/messages/{mid}/edit   {content} -> tree (a new sibling branch)
    POST   /corral/api/conversations/{id}/select     {message_id} -> tree (shows that branch)
    GET    /corral/api/export[?id=ID]                {"format": "corral-webui", "version", "conversations"}
    POST   /corral/api/import                        the export's JSON -> {"imported": [new ids]}

Errors answer ``{"error": "..."}`` with 400 (bad input, named), 404 (no such id) or 413 (import too big).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from corral.errors import CorralError
from corral.server.conversations import ConversationError, ConversationNotFound, ConversationStore
from corral.server.errors import BadRequest, disk_full
from corral.server.jsonbody import parse_json

STATIC_DIR = Path(__file__).parent / "static"
MAX_IMPORT_BYTES = 64 << 20
# Model output is rendered with textContent only; this policy is the second wall: no inline script,
# no inline handlers (onerror=...), nothing fetched from another origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
               ".txt": "text/plain; charset=utf-8", ".ico": "image/x-icon"}
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")
_lock = threading.Lock()

router = APIRouter()


def conversations(request: Request) -> ConversationStore:
    """The app's conversation store, opened on first use under the model store's home (CORRAL_HOME)."""
    app_state = request.app.state
    with _lock:
        store = getattr(app_state, "corral_conversations", None)
        if store is None:
            home = getattr(getattr(getattr(app_state, "corral", None), "store", None), "home", None)
            store = ConversationStore(Path(home) / "webui.sqlite3" if home is not None else None)
            app_state.corral_conversations = store
    return store


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _call(request: Request, fn, *args: Any, **kwargs: Any) -> Any:
    """Run a store method off the event loop; typed errors become JSON answers."""
    store = conversations(request)
    try:
        return await run_in_threadpool(getattr(store, fn), *args, **kwargs)
    except ConversationNotFound as e:
        return _error(404, str(e))
    except CorralError as e:
        if disk_full(e):
            raise  # the app's handler answers 507
        return _error(400, str(e))


async def _body(request: Request, limit: int = 2 << 20, allowed: set[str] | None = None) -> dict | JSONResponse:
    """The JSON object sent, or the error response to return; `allowed` names the only fields accepted."""
    raw = await request.body()
    if len(raw) > limit:
        return _error(413, f"body is {len(raw)} bytes; the limit is {limit}")
    try:
        body = parse_json(raw or b"{}")  # bad JSON, deep nesting, lone surrogates
    except BadRequest as e:
        return _error(400, str(e))
    unknown = set(body) - allowed if allowed is not None else set()
    if unknown:
        return _error(400, f"unknown field(s) {sorted(unknown)}")
    return body


# -- the page and its files ---------------------------------------------------------------------
@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index(request: Request) -> Response:
    """The page for a browser; for tools, Ollama's health answer (its clients and scripts probe `GET|HEAD /`)."""
    if "text/html" not in request.headers.get("accept", ""):
        return PlainTextResponse("Ollama is running")
    return FileResponse(STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=SECURITY_HEADERS)


@router.get("/corral/static/{path:path}", include_in_schema=False)
async def static(path: str) -> Response:
    parts = path.split("/")
    if len(parts) > 3 or not all(_STATIC_NAME.match(p) for p in parts):  # no "..", no hidden files
        return _error(404, "not found")
    file = STATIC_DIR.joinpath(*parts)
    if not file.is_file() or file.suffix not in MEDIA_TYPES:
        return _error(404, "not found")
    return FileResponse(file, media_type=MEDIA_TYPES[file.suffix], headers=SECURITY_HEADERS)


# -- models: names and context lengths for the picker and the context meter ----------------------
@router.get("/corral/api/models")
async def models(request: Request) -> Any:
    state = getattr(request.app.state, "corral", None)
    pool = getattr(state, "pool", None)
    store = getattr(state, "store", None)
    default = getattr(pool, "default_model", None)
    out: dict[str, dict] = await run_in_threadpool(_stored_models, store) if store is not None else {}
    for alias in getattr(pool, "paths", {}) or {}:
        out.setdefault(alias, {"name": alias, "context_length": None, "loaded": False})
    if default and default not in out:
        out[default] = {"name": default, "context_length": None, "loaded": False}
    for loaded in pool.loaded() if pool is not None else []:
        out.setdefault(loaded.name, {"name": loaded.name})
        out[loaded.name].update(loaded=True, context_length=loaded.context_length)
    for item in out.values():
        item["default"] = item["name"] == default
    return sorted(out.values(), key=lambda m: (not m["default"], m["name"]))


def _stored_models(store) -> dict[str, dict]:
    """Every store entry with the context length its config records (file reads: run off the event loop)."""
    return {str(e.name): {"name": str(e.name), "context_length": _stored_context(store, e.name), "loaded": False}
            for e in store.entries()}


def _stored_context(store, name) -> int | None:
    try:
        value = store.info(name).config.get("context_length")
    except (CorralError, OSError):
        return None
    return value if isinstance(value, int) else None


# -- conversations ------------------------------------------------------------------------------
@router.get("/corral/api/conversations")
async def list_conversations(request: Request, q: str | None = None) -> Any:
    return await _call(request, "list", q)


@router.post("/corral/api/conversations")
async def create_conversation(request: Request) -> Any:
    body = await _body(request, allowed={"title", "model", "system", "params"})
    if isinstance(body, JSONResponse):
        return body
    return await _call(request, "create", **body)


@router.get("/corral/api/conversations/{conv_id}")
async def get_conversation(request: Request, conv_id: str) -> Any:
    return await _call(request, "get", conv_id)


@router.patch("/corral/api/conversations/{conv_id}")
async def update_conversation(request: Request, conv_id: str) -> Any:
    body = await _body(request)
    if isinstance(body, JSONResponse):
        return body
    return await _call(request, "update", conv_id, **body)


@router.delete("/corral/api/conversations/{conv_id}")
async def delete_conversation(request: Request, conv_id: str) -> Any:
    result = await _call(request, "delete", conv_id)
    return result if isinstance(result, JSONResponse) else Response(status_code=204)


# -- messages: each answers the whole tree, which is what the page redraws from ------------------
@router.post("/corral/api/conversations/{conv_id}/messages")
async def add_message(request: Request, conv_id: str) -> Any:
    body = await _body(request, allowed={"role", "content", "parent_id", "stats"})
    if isinstance(body, JSONResponse):
        return body
    kwargs = {"parent_id": body["parent_id"]} if "parent_id" in body else {}
    if "parent_id" in kwargs and kwargs["parent_id"] is not None and not isinstance(kwargs["parent_id"], str):
        return _error(400, "parent_id must be a string or null")
    result = await _call(request, "add_message", conv_id, body.get("role"), body.get("content"),
                         stats=body.get("stats"), **kwargs)
    return result if isinstance(result, JSONResponse) else await _call(request, "get", conv_id)


@router.post("/corral/api/conversations/{conv_id}/messages/{message_id}/edit")
async def edit_message(request: Request, conv_id: str, message_id: str) -> Any:
    body = await _body(request)
    if isinstance(body, JSONResponse):
        return body
    result = await _call(request, "edit_message", conv_id, message_id, body.get("content"))
    return result if isinstance(result, JSONResponse) else await _call(request, "get", conv_id)


@router.post("/corral/api/conversations/{conv_id}/select")
async def select_branch(request: Request, conv_id: str) -> Any:
    body = await _body(request)
    if isinstance(body, JSONResponse):
        return body
    return await _call(request, "select", conv_id, body.get("message_id"))


# -- export / import ----------------------------------------------------------------------------
@router.get("/corral/api/export")
async def export(request: Request, id: str | None = None) -> Any:
    result = await _call(request, "export", [id] if id else None)
    if isinstance(result, JSONResponse):
        return result
    return JSONResponse(result, headers={"Content-Disposition": 'attachment; filename="corral-chats.json"'})


@router.post("/corral/api/import")
async def import_conversations(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_IMPORT_BYTES:
        return _error(413, f"import is {len(raw)} bytes; the limit is {MAX_IMPORT_BYTES}")
    try:
        data = await run_in_threadpool(parse_json, raw)  # up to 64 MiB: checked off the event loop
    except BadRequest as e:
        return _error(400, str(e))
    result = await _call(request, "import_", data)
    return result if isinstance(result, JSONResponse) else {"imported": result}


__all__ = ["router", "conversations", "ConversationError"]
