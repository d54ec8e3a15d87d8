"""POST /v1/responses: OpenAI's Responses API (what the `openai` SDK's ``client.responses.create`` calls),
for text: ``input`` (a string or a list of messages with text parts), ``instructions``, ``max_output_tokens``,
sampling fields, ``text.format`` (json_schema / json_object) and ``stream``.

The body is translated into a chat request (instructions -> a system message, input items ->
messages), so every check and the generation itself are /v1/chat/completions'; only the answer's
shape differs: one ``response`` object, or SSE events ``event: response.output_text.delta`` ...
ending with ``response.completed`` (no ``[DONE]`` in this API). Tools, images, stored responses
(``previous_response_id``) and reasoning are a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from corral.server.errors import BadRequest, error_body
from corral.server.generation import (
    IMAGE_PARTS,
    Generation,
    GenerationStream,
    Prompt,
    check_prompt_size,
    released_on_error,
    text_chars,
)
from corral.server.openai import SSE_HEADERS, checked_model, plan_chat, read_json, submit_request
from corral.server.schemas import parse_chat
from corral.server.state import get_state

router = APIRouter()
TEXT_PARTS = ("input_text", "output_text", "text")
UNSUPPORTED = {"tools": "use /v1/chat/completions for tools",
               "previous_response_id": "responses are not stored (send the whole conversation as input)",
               "reasoning": "Corral serves no reasoning models", "background": "responses run in the foreground"}
RENAMED = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}


def chat_body(body: dict) -> dict:
    """A Responses body -> the equivalent /v1/chat/completions body (400 for what has no equivalent)."""
    problems = [(k, f"{k} is not supported: {why}") for k, why in UNSUPPORTED.items()
                if body.get(k) not in (None, [], {}, "", False)]
    messages: list[dict] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            problems.append(("instructions", "instructions must be a string"))
        messages.append({"role": "system", "content": body["instructions"]})
    raw = body.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        problems.append(("input", "input must be a string or a non-empty list of messages"))
        items = []
    for i, item in enumerate(items):
        message, why = _message(item)
        if why:
            problems.append(("input", f"input[{i}]: {why}"))
        else:
            messages.append(message)
    if problems:
        raise BadRequest(problems)
    out = {k: body[k] for k in ("model", "temperature", "top_p", "stream", "keep_alive", "seed") if k in body}
    out.update(messages=messages, max_tokens=body.get("max_output_tokens"))
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["response_format"] = {"type": "json_schema", "json_schema": {k: fmt.get(k) for k in ("name", "schema")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    return out


def _message(item: Any) -> tuple[dict, str | None]:
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        return {}, f"only message items are supported, got {kind!r}"
    content = item.get("content")
    if isinstance(content, list):
        if any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in content):
            return {}, "images are not supported (text parts only)"
        if not all(isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str)
                   for p in content):
            return {}, "content parts must be input_text or output_text"
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        return {}, "content must be a string or a list of text parts"
    return {"role": item.get("role"), "content": content}, None


@router.post("/v1/responses")
async def responses(request: Request):
    state = get_state(request)
    body = await read_json(request)
    req = parse_chat(chat_body(body))
    req.problems = [(RENAMED.get(name, name), why) for name, why in req.problems]
    model = await checked_model(state, req)
    with released_on_error(state, model):
        await check_prompt_size(model, text_chars(req.messages), "input")
        plan = await asyncio.to_thread(plan_chat, model, req)
        gen = submit_request(state, model, req, Prompt(plan.ids, plan.messages), "input", plan.constraint)
    shape = Shape(gen, req.model or model.name, body)
    if req.stream:
        return GenerationStream([gen], shape.events(), "text/event-stream", SSE_HEADERS)
    await gen.wait(request)
    return shape.response("completed")


class Shape:
    """The response object and its stream events for one generation (n is always 1 here)."""

    def __init__(self, gen: Generation, name: str, body: dict):
        self.gen, self.name, self.body = gen, name, body
        self.id, self.item_id = f"resp_{gen.id}", f"msg_{secrets.token_hex(12)}"
        self.seq = 0

    def item(self, status: str) -> dict:
        text = self.gen.samples[0].text
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] \
            if status != "in_progress" else []
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def response(self, status: str) -> dict:
        finish = self.gen.samples[0].finish
        if status == "completed" and finish not in ("stop", None):
            status = "incomplete"
        u = self.gen.usage()
        return {"id": self.id, "object": "response", "created_at": self.gen.created, "status": status,
                "model": self.name, "output": [] if status == "in_progress" else [self.item("completed")],
                "incomplete_details": {"reason": "max_output_tokens" if finish == "length" else finish}
                if status == "incomplete" else None,
                "instructions": self.body.get("instructions"), "max_output_tokens": self.body.get("max_output_tokens"),
                "temperature": self.body.get("temperature"), "top_p": self.body.get("top_p"),
                "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "error": None, "metadata": {},
                "usage": {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                          "total_tokens": u["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))
        yield self.event("response.output_item.added", output_index=0, item=self.item("in_progress"))
        yield self.event("response.content_part.added", **where,
                         part={"type": "output_text", "text": "", "annotations": []})
        async for d in self.gen.deltas():
            if d.finish == "error":
                _, body = error_body(self.gen.error(), "openai")
                yield self.event("error", **{k: body["error"][k] for k in ("message", "code", "param")})
                return
            if d.text:
                yield self.event("response.output_text.delta", **where, delta=d.text, logprobs=[])
        text = self.gen.samples[0].text
        yield self.event("response.output_text.done", **where, text=text, logprobs=[])
        yield self.event("response.content_part.done", **where,
                         part={"type": "output_text", "text": text, "annotations": []})
        yield self.event("response.output_item.done", output_index=0, item=self.item("completed"))
        final = self.response("completed")
        yield self.event(f"response.{final['status']}", response=final)
