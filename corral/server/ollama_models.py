"""Ollama's model routes over the store and the pool: tags, show, ps, copy, delete, create, blobs, embed.

    GET  /api/tags      {"models": [{name, model, modified_at, size, digest, details}]}
    POST /api/show      {model, verbose?} -> {modelfile, parameters, template, system, license, details,
                        model_info, modified_at, capabilities}
    GET  /api/ps        {"models": [{name, model, size, digest, details, expires_at, size_vram, context_length}]}
    POST /api/copy      {source, destination}; DELETE /api/delete {model}
    POST /api/create    {model, from | files, adapters, template, system, parameters, license, messages,
                        quantize, stream} or the older {model, modelfile}; status lines, last "success"
    HEAD/POST /api/blobs/sha256:<hex>   (POST streams the body into the store, hashed on the way)
    POST /api/embed     {model, input: str | [str], truncate=true, dimensions?} -> {embeddings: [[...]]}
    POST /api/embeddings  {model, prompt} -> {embedding: [...]} (legacy)

Digests in tags and ps are the manifest's sha256 in hex, as Ollama shows them. Store work (disk,
hashing, flock) runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from corral.errors import ModelNotFoundError
from corral.server.embeddings import until_disconnect
from corral.server.errors import BadRequest
from corral.server.ollama_registry import ingest_request_body
from corral.server.ollama_wire import flag, iso, name_field, ns, progress_response, read_body
from corral.server.schemas import MAX_EMBED_INPUTS
from corral.server.state import DEFAULT_MODEL, get_state, parse_keep_alive

router = APIRouter()
LONG_LIST = 16  # model_info lists longer than this (the vocabulary, merges) are null unless verbose, as in Ollama


def details_of(config: dict) -> dict:
    return {"parent_model": "", "format": config.get("model_format", ""), "family": config.get("model_family", ""),
            "families": config.get("model_families") or [config.get("model_family", "")],
            "parameter_size": config.get("model_type", ""),
            "quantization_level": config.get("quant") or config.get("file_type", "")}


# -- tags, show, ps -------------------------------------------------------------------------------
def _register_embedded(store) -> None:
    """The embedded SmolLM2 registers on first use; Ollama clients list and show models before using one, so
    tags and show register it too (as /v1/models lists it on a fresh store)."""
    from corral.store.load import ensure_default

    try:
        ensure_default(store)
    except ModelNotFoundError:
        pass  # its package is not installed: there is nothing to show


def _embedded_tag(store) -> dict | None:
    """The embedded SmolLM2 as /api/tags lists it before it is stored (as /v1/models does), read from its file:
    listing writes nothing. Its digest stands for the file (name, size, time); registering gives the real one."""
    import hashlib

    from corral.llm import default_model_path
    from corral.store.create import describe
    from corral.store.names import parse_name

    if store.manifest_path(parse_name(DEFAULT_MODEL)).is_file():
        return None
    try:
        path = default_model_path()
    except ModelNotFoundError:
        return None
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return {"name": DEFAULT_MODEL, "model": DEFAULT_MODEL, "modified_at": iso(stat.st_mtime), "size": stat.st_size,
            "digest": digest, "details": details_of(describe(path, "gguf"))}


def _tags(store) -> dict:
    embedded = _embedded_tag(store)
    models = [embedded] if embedded else []
    for entry in store.entries():
        try:
            config = store.info(entry.name).config
        except (ModelNotFoundError, ValueError):
            continue  # removed meanwhile, or a config blob gone bad: `corral verify` reports it
        name = str(entry.name)
        models.append({"name": name, "model": name, "modified_at": iso(entry.modified), "size": entry.size,
                       "digest": entry.digest.removeprefix("sha256:"), "details": details_of(config)})
    return {"models": models}


@router.get("/tags")
async def tags(request: Request) -> dict:
    return await asyncio.to_thread(_tags, get_state(request).store)


def _parameters_text(params: dict) -> str:
    lines = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(item) if isinstance(item, str) else item}")
    return "\n".join(lines)


def _gguf_info(path, verbose: bool) -> tuple[dict, str | None]:
    """(model_info, the file's own chat template) from a GGUF header."""
    from corral.checkpoint.gguf_reader import read_gguf

    with read_gguf(path) as g:
        meta = dict(g.metadata)
    info = {k: (None if isinstance(v, list) and len(v) > LONG_LIST and not verbose else v) for k, v in meta.items()}
    return info, meta.get("tokenizer.chat_template")


def _show(store, name: str, verbose: bool) -> dict:
    from corral.store import Modelfile, render_modelfile
    from corral.store import manifest as mt

    if name.strip().lower() in (DEFAULT_MODEL, f"library/{DEFAULT_MODEL}"):
        _register_embedded(store)
    info = store.info(name)
    c = info.config
    gguf = info.manifest.layers_of(mt.MODEL)
    source = store.blobs.path(gguf[0].digest) if gguf else store.model_path(info.name)
    model_info: dict[str, Any] = {"general.architecture": c.get("model_family", "llama"),
                                  "general.parameter_count": c.get("model_type"),
                                  "llama.context_length": c.get("context_length"),
                                  "llama.embedding_length": c.get("embedding_length"),
                                  "llama.block_count": c.get("block_count")}
    template = info.template
    if gguf:
        header, own_template = _gguf_info(source, verbose)
        model_info.update(header)
        template = template or own_template
    adapters = [str(store.blobs.path(d.digest)) for d in info.manifest.layers_of(mt.ADAPTER)]
    modelfile = render_modelfile(Modelfile(str(source), dict(info.parameters), info.template, info.system, adapters,
                                           list(info.licenses), list(info.messages)))
    entry = next((e for e in store.entries() if e.name == info.name), None)
    return {"modelfile": modelfile, "parameters": _parameters_text(info.parameters), "template": template or "",
            "system": info.system or "", "license": "\n\n".join(info.licenses), "details": details_of(c),
            "messages": info.messages, "model_info": model_info,
            "modified_at": iso(entry.modified if entry else None), "capabilities": ["completion", "tools"]}


@router.post("/show")
async def show(request: Request) -> dict:
    body = await read_body(request)
    name = name_field(body, "model", "name")
    return await asyncio.to_thread(_show, get_state(request).store, name, flag(body, "verbose", False))


@router.get("/ps")
async def ps(request: Request) -> dict:
    models = []
    for m in get_state(request).pool.loaded():
        on_gpu = m.llm.engine.device.type != "cpu"
        models.append({"name": m.name, "model": m.name, "size": m.size_bytes,
                       "digest": m.digest.removeprefix("sha256:"), "details": m.details,
                       "expires_at": iso(m.expires_at), "size_vram": m.size_bytes if on_gpu else 0,
                       "context_length": m.context_length})
    return {"models": models}


# -- copy, delete ------------------------------------------------------------------------------------
@router.post("/copy")
async def copy(request: Request) -> Response:
    body = await read_body(request)
    source, dest = name_field(body, "source"), name_field(body, "destination")
    await asyncio.to_thread(get_state(request).store.copy, source, dest)
    return Response(status_code=200)


@router.delete("/delete")
async def delete(request: Request) -> Response:
    body = await read_body(request)
    name = name_field(body, "model", "name")
    state = get_state(request)
    await asyncio.to_thread(state.store.remove, name)
    state.metrics.forget(state.pool.resolve(name))
    # A loaded copy drains (running requests finish) and later requests get 404, as the store now says.
    await state.pool.unload(name)
    return Response(status_code=200)


# -- blobs ----------------------------------------------------------------------------------------
@router.head("/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    from corral.store.names import check_digest

    check_digest(digest)
    present = await asyncio.to_thread(get_state(request).store.blobs.has, digest)
    return Response(status_code=200 if present else 404)


@router.post("/blobs/{digest}")
async def blob_upload(request: Request, digest: str) -> Response:
    await ingest_request_body(request, get_state(request).store, digest)
    return Response(status_code=201)


# -- create -----------------------------------------------------------------------------------------
@router.post("/create")
async def create(request: Request) -> Response:
    from corral.server.ollama_create import create_from_request

    body = await read_body(request)
    name = name_field(body, "model", "name")
    store = get_state(request).store
    return await progress_response(lambda report: create_from_request(store, name, body, report),
                                   flag(body, "stream", True))


# -- embed --------------------------------------------------------------------------------------------
def _inputs(body: dict, key: str) -> list[str]:
    value = body.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_EMBED_INPUTS:
            raise BadRequest([(key, f"{key} holds {len(value)} items; at most {MAX_EMBED_INPUTS} per request")])
        return list(value)
    raise BadRequest([(key, f"{key} must be a string or a list of strings")])


async def _embed(request: Request, body: dict, texts: list[str], truncate: bool) -> tuple[list, int, float]:
    """(vectors as lists, prompt tokens, load seconds)."""
    name = body.get("model") or ""
    if "minilm" in name.lower():  # as /v1/embeddings decides: the shared, cached all-MiniLM-L6-v2
        from corral.server.embeddings import sentence_encoder

        started = time.perf_counter()
        encoder = await sentence_encoder(get_state(request))
        load_s = time.perf_counter() - started
        if not texts:
            return [], 0, load_s
        vectors = await asyncio.to_thread(encoder.encode, texts, truncate=truncate)
        tokens = sum(min(n, encoder.max_tokens) for n in encoder.count_tokens(texts))
        return vectors.tolist(), tokens, load_s
    from corral.embed.llm_embed import embed_rows, token_rows

    state = get_state(request)
    started = time.perf_counter()
    model = await state.pool.get(name or None, parse_keep_alive(body.get("keep_alive")))
    load_s = time.perf_counter() - started
    try:
        if not texts:
            return [], 0, load_s
        llm = model.llm

        def work(stop):
            rows = token_rows(llm, texts, truncate=truncate)  # tokenized once, off the event loop
            return embed_rows(llm.model, rows, stop=stop), sum(len(r) for r in rows)

        vectors, tokens = await until_disconnect(request, work)
        return vectors.tolist(), tokens, load_s
    finally:
        state.pool.release(model)


def _cut(vectors: list[list[float]], dimensions: Any) -> list[list[float]]:
    """Keep the first `dimensions` values of each vector and rescale it to unit length."""
    if dimensions is None or not vectors:
        return vectors
    width = len(vectors[0])
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= width:
        raise BadRequest([("dimensions", f"dimensions must be an integer in [1, {width}], got {dimensions!r}")])
    out = []
    for v in vectors:
        head = v[:dimensions]
        norm = sum(x * x for x in head) ** 0.5 or 1.0
        out.append([x / norm for x in head])
    return out


@router.post("/embed")
async def embed(request: Request) -> JSONResponse:
    started = time.perf_counter()
    body = await read_body(request)
    texts = _inputs(body, "input")
    vectors, tokens, load_s = await _embed(request, body, texts, flag(body, "truncate", True))
    return JSONResponse({"model": body.get("model") or "", "embeddings": _cut(vectors, body.get("dimensions")),
                         "total_duration": ns(time.perf_counter() - started), "load_duration": ns(load_s),
                         "prompt_eval_count": tokens})


@router.post("/embeddings")
async def embeddings(request: Request) -> JSONResponse:
    body = await read_body(request)
    texts = _inputs(body, "prompt")[:1]
    vectors, _, _ = await _embed(request, body, texts, truncate=True)
    return JSONResponse({"embedding": vectors[0] if vectors else []})
