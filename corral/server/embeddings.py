"""/v1/models and /v1/embeddings (OpenAI dialect; openai.py includes this router).

Embedding models: a name containing "minilm" uses the small sentence encoder (all-MiniLM-L6-v2,
384 floats, loaded once and kept); any other name is a generative model from the pool, whose
mean-pooled final hidden states are the vector (corral.embed.embed_with_llm). Inputs over the
model's limit are a 400 naming the input, never cut silently; a request holds at most MAX_EMBED_INPUTS.

Embedding runs in a worker thread. A client that leaves is noticed (polling, as a non-streamed generation
does) and the forward stops at its next layer (corral.embed.llm_embed.StopCheck), so an 8k-token input
does not run on for minutes after its client has gone (RELIABILITY 42). Time per input grows with the
square of its length: every token attends to all before it (see docs/embeddings.md).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable

from fastapi import APIRouter, Request

from corral.server.errors import BadRequest, HTTPError
from corral.server.generation import DISCONNECT_POLL_S
from corral.server.pool import ModelNotFound
from corral.server.schemas import EmbeddingRequest, parse_embedding, parse_json
from corral.server.state import ServerState, get_state

router = APIRouter()


def model_card(name: str, created: float) -> dict:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "corral"}


def model_cards(state: ServerState) -> list[dict]:
    """Stored models, registered paths and whatever is loaded; the default model even before it is stored."""
    cards = {str(e.name): model_card(str(e.name), e.modified) for e in state.store.entries()}
    for model in state.pool.loaded():
        cards.setdefault(model.name, model_card(model.name, model.loaded_at))
    for alias in state.pool.paths:
        cards.setdefault(alias, model_card(alias, time.time()))
    default = state.pool.resolve(None)
    cards.setdefault(default, model_card(default, time.time()))
    return sorted(cards.values(), key=lambda c: c["id"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = get_state(request)
    return {"object": "list", "data": await asyncio.to_thread(model_cards, state)}


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str) -> dict:
    state = get_state(request)
    key = state.pool.resolve(name)
    for card in await asyncio.to_thread(model_cards, state):
        if card["id"] in (name, key):
            return card
    raise ModelNotFound(f"model {name!r} not found")


async def sentence_encoder(state: ServerState):
    """The MiniLM encoder, loaded on first use and kept (90 MB)."""
    async with state.embedders.setdefault("lock", asyncio.Lock()):
        encoder = state.embedders.get("minilm")
        if encoder is None:
            from corral.embed import SentenceEncoder

            encoder = await asyncio.to_thread(SentenceEncoder.load)
            state.embedders["minilm"] = encoder
    return encoder


def _encode_minilm(encoder, req: EmbeddingRequest):
    if isinstance(req.inputs[0], str):
        counts = encoder.count_tokens(req.inputs)
        return encoder.encode(req.inputs, truncate=False), sum(counts)
    rows = req.inputs
    _check_ids(rows, encoder.tokenizer.get_vocab_size(), encoder.max_tokens)
    return encoder.embed_batch(rows), sum(len(r) for r in rows)


def _encode_llm(llm, req: EmbeddingRequest, stop: Callable[[], bool]):
    from corral.embed.llm_embed import embed_rows, token_rows

    if isinstance(req.inputs[0], str):
        rows, batch = token_rows(llm, req.inputs, truncate=False), 8  # tokenized once, in this worker thread
    else:  # token ids: one row at a time, unpadded, as a client that sends ids may compare them exactly
        rows, batch = req.inputs, 1
        _check_ids(rows, llm.config.vocab_size, llm.engine.max_seq_len)
    return embed_rows(llm.model, rows, batch_size=batch, stop=stop), sum(len(r) for r in rows)


async def until_disconnect(request: Request, work: Callable[[Callable[[], bool]], object]):
    """Run work(stop) in a worker thread; stop() turns True once the client has gone, and then the work's
    EmbedCancelled ends the request (the answer goes nowhere: 499, as nginx logs a closed request)."""
    from corral.embed.llm_embed import EmbedCancelled

    gone = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        return await asyncio.to_thread(work, gone.is_set)
    except EmbedCancelled:
        raise HTTPError("the client closed the request", status=499) from None
    finally:
        watcher.cancel()


def _check_ids(rows: list[list[int]], vocab: int, limit: int) -> None:
    for i, row in enumerate(rows):
        if not all(0 <= t < vocab for t in row):
            raise BadRequest(f"input {i}: token ids must be in [0, {vocab})", param="input")
        if len(row) > limit:
            raise BadRequest(f"input {i} has {len(row)} tokens; the model embeds at most {limit}", param="input")


def _vector(row, fmt: str, dims: int | None):
    import torch

    if dims is not None:
        if dims > row.shape[0]:
            raise BadRequest(f"dimensions must be at most {row.shape[0]} for this model, got {dims}",
                             param="dimensions")
        row = torch.nn.functional.normalize(row[:dims], dim=0)  # a unit vector again, as OpenAI's v3 models do
    row = row.to(torch.float32).contiguous()
    if fmt == "base64":
        return base64.b64encode(row.numpy().astype("<f4").tobytes()).decode()
    return row.tolist()


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> dict:
    state = get_state(request)
    req = parse_embedding(parse_json(await request.body()))
    if req.model and "minilm" in req.model.lower():
        encoder = await sentence_encoder(state)
        vectors, tokens = await asyncio.to_thread(_encode_minilm, encoder, req)
        name = req.model
    else:
        model = await state.pool.get(req.model)
        try:
            vectors, tokens = await until_disconnect(request, lambda stop: _encode_llm(model.llm, req, stop))
        finally:
            state.pool.release(model)
        name = req.model or model.name
    data = [{"object": "embedding", "index": i, "embedding": _vector(v, req.encoding_format, req.dimensions)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
