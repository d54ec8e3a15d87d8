"""The Ollama dialect: ``/api/generate`` and ``/api/chat`` here; the model routes (tags, show, ps, create,
copy, delete, blobs, embed) in ollama_models.py; pull, push and the ``/v2/`` registry in ollama_registry.py.

A generation is: read the body -> pool.get(model) -> token ids (template, system, context, FIM) ->
options -> scheduler.submit -> NDJSON lines (``application/x-ndjson``, the default) or one JSON object:

    {"model", "created_at", "response": "<text>", "done": false}            (chat: "message": {...})
    {"model", "created_at", "response": "", "done": true, "done_reason": "stop" | "length",
     "context": [ids] (generate only), "total_duration", "load_duration", "prompt_eval_count",
     "prompt_eval_duration", "eval_count", "eval_duration"}                  (durations in nanoseconds)

Errors before the first line are a status + ``{"error": "..."}``; an engine failure mid-stream is a
final ``{"error": "..."}`` line (RELIABILITY 24). The lifecycle (hold, filters, submit, cancel when
the client goes away, release) is corral.server.generation's; this module renders its Deltas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from corral.server import generation
from corral.server.errors import BadRequest
from corral.server.generation import (
    Generation,
    GenerationStream,
    Prompt,
    chat_messages,
    check_prompt_size,
    released_on_error,
    text_chars,
)
from corral.server.ollama_options import constraint_factory, parse_options
from corral.server.ollama_wire import NDJSON, flag, line, no_images, now_iso, ns, read_body, text_field
from corral.server.state import LoadedModel, ModelNotFound, ServerState, get_state, parse_keep_alive
from corral.server.toolcalls import CallFilter, with_tool_prompt

router = APIRouter(prefix="/api")
# Fill-in-the-middle token triples (prefix, suffix, middle) as vocabularies spell them: Qwen/CodeGemma
# style, StarCoder/SantaCoder style, Code Llama style. A model with none of them cannot take `suffix`.
FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
              ("<PRE>", "<SUF>", "<MID>"))


UNSUPPORTED = {"think": "Corral serves no thinking models", "logprobs": "use /v1/chat/completions for logprobs",
               "top_logprobs": "use /v1/chat/completions for logprobs"}


def refuse_unsupported(body: dict) -> None:
    """Fields Corral cannot honour are a 400 naming each, never silently ignored."""
    no_images(body.get("images"))
    problems = [(key, f"{key} is not supported: {why}") for key, why in UNSUPPORTED.items()
                if body.get(key) not in (None, False, 0, "")]
    if problems:
        raise BadRequest(problems)


# -- rendering one generation -------------------------------------------------------------------------
@dataclass
class Answer:
    """A generation as Ollama reports it: the name the client gave (echoed back) and the request's clock."""

    gen: Generation
    name: str
    started: float
    load_s: float

    def stats(self) -> dict[str, Any]:
        timings = self.gen.timings()
        return {"total_duration": ns(time.perf_counter() - self.started), "load_duration": ns(self.load_s),
                "prompt_eval_count": self.gen.prompt_tokens, "prompt_eval_duration": ns(timings.get("prefill_s")),
                "eval_count": self.gen.samples[0].tokens, "eval_duration": ns(timings.get("decode_s"))}

    def head(self) -> dict[str, Any]:
        return {"model": self.name, "created_at": now_iso()}


class GenerateReply:
    """Lines of /api/generate."""

    def __init__(self, answer: Answer):
        self.answer = answer

    def feed(self, text: str) -> list[dict]:
        return [{**self.answer.head(), "response": text, "done": False}] if text else []

    def end(self, reason: str) -> list[dict]:
        gen = self.answer.gen
        return [{**self.answer.head(), "response": "", "done": True, "done_reason": reason,
                 "context": gen.prompt.ids + gen.output_ids(), **self.answer.stats(), **gen.extras(0)}]

    @staticmethod
    def merge(lines: list[dict]) -> dict:
        return {**lines[-1], "response": "".join(line["response"] for line in lines)}


class ChatReply:
    """Lines of /api/chat; with tools, text that may be a call is held back until the reply ends."""

    def __init__(self, answer: Answer, tools: bool):
        self.answer = answer
        self.filter = CallFilter() if tools else None
        self.text: list[str] = []

    def _line(self, message: dict) -> dict:
        return {**self.answer.head(), "message": {"role": "assistant", **message}, "done": False}

    def feed(self, text: str) -> list[dict]:
        self.text.append(text)
        shown = self.filter.push(text) if self.filter else text
        return [self._line({"content": shown})] if shown else []

    def end(self, reason: str) -> list[dict]:
        lines = []
        if self.filter is not None:
            parsed = self.answer.gen.model.llm.chat_format.parse_reply("".join(self.text))
            held = self.filter.finish()
            if parsed.tool_calls:
                calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in parsed.tool_calls]
                lines.append(self._line({"content": "", "tool_calls": calls}))
            elif held:
                lines.append(self._line({"content": held}))
        final = self._line({"content": ""})
        final.update(done=True, done_reason=reason, **self.answer.stats(), **self.answer.gen.extras(0))
        return [*lines, final]

    @staticmethod
    def merge(lines: list[dict]) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(x["message"]["content"] for x in lines)}
        calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
        if calls:
            message["tool_calls"] = calls
        return {**lines[-1], "message": message}


async def ndjson(gen: Generation, reply: GenerateReply | ChatReply) -> AsyncIterator[bytes]:
    """The streamed answer; an engine failure mid-stream is a final {"error"} line (RELIABILITY 24)."""
    async for d in gen.deltas():
        if d.finish == "error":
            yield line({"error": str(gen.error())})
            return
        for out in reply.feed(d.text):
            yield line(out)
        if d.finish is not None:
            for out in reply.end(d.finish):
                yield line(out)


async def respond(request: Request, gen: Generation, reply: GenerateReply | ChatReply, stream: bool) -> Response:
    if stream:
        return GenerationStream([gen], ndjson(gen, reply), NDJSON)
    await gen.wait(request)  # an engine failure raises its 500 here
    sample = gen.samples[0]
    return JSONResponse(reply.merge([*reply.feed(sample.text), *reply.end(sample.finish or "stop")]))


async def start(request: Request, body: dict, model: LoadedModel, name: str, chars: int,
                make_prompt: Callable[[], Prompt], started: float, load_s: float) -> Answer:
    """The prompt (its size checked, then tokenized off the event loop), options and format -> a started
    generation (400s here, before any line is sent). From the call on, the model is the generation's."""
    state = get_state(request)
    llm = model.llm
    with released_on_error(state, model):
        await check_prompt_size(model, chars, "messages" if "messages" in body else "prompt")
        prompt = await asyncio.to_thread(make_prompt)
        plan = parse_options(body.get("options"), model.options).plan(len(prompt.ids), model.context_length)
        # The first constraint of a tokenizer indexes its vocabulary (seconds): off the event loop.
        factory = await asyncio.to_thread(constraint_factory, body.get("format"), llm.tokenizer,
                                          llm.config.vocab_size)
        gen = generation.start(state, model, prompt, plan.params, stop=plan.stop, constraint=factory)
    return Answer(gen, name, started, load_s)


async def load_or_unload(state: ServerState, name: str | None, keep_alive: float | None, chat: bool) -> JSONResponse:
    """An empty prompt (or no messages) loads the model, or with keep_alive 0 unloads it (Ollama's behaviour)."""
    key = state.pool.resolve(name)
    if keep_alive == 0:
        if not await state.pool.unload(key) and not model_exists(state, key):
            raise ModelNotFound(f"model {key!r} not found")
        reason = "unload"
    else:
        state.pool.release(await state.pool.get(name, keep_alive))
        reason = "load"
    body: dict[str, Any] = {"model": name or key, "created_at": now_iso(), "done": True, "done_reason": reason}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return JSONResponse(body)


def model_exists(state: ServerState, key: str) -> bool:
    from corral.store.names import parse_name

    return key in state.pool.paths or state.store.manifest_path(parse_name(key)).is_file()


async def hold_model(request: Request, body: dict) -> tuple[LoadedModel, str, float, float]:
    """(loaded model, name as given, request start, load seconds)."""
    started = time.perf_counter()
    name = body.get("model")
    model = await get_state(request).pool.get(name, parse_keep_alive(body.get("keep_alive")))
    return model, name or model.name, started, time.perf_counter() - started


# -- /api/generate ---------------------------------------------------------------------------------
def fim_prompt(model: LoadedModel, prompt: str, suffix: str) -> list[int]:
    tok, llm = model.llm.tokenizer, model.llm
    specials = tok.special_tokens
    for pre, suf, mid in FIM_TOKENS:
        if pre in specials and suf in specials and mid in specials:
            bos = [tok.bos_id] if llm.add_bos and tok.bos_id is not None else []
            return [*bos, specials[pre], *tok.encode(prompt), specials[suf], *tok.encode(suffix), specials[mid]]
    raise BadRequest([("suffix", f"{model.name} does not support insert (suffix): its vocabulary has no "
                                 "fill-in-the-middle tokens")])


def _template_format(model: LoadedModel, template: str):
    """A request's TEMPLATE: Jinja, like a Modelfile's (Go templates are not supported)."""
    from corral.tokenizer.template import template_chat_format

    return template_chat_format(template, model.llm.tokenizer, stop_ids=model.llm.stop_ids)


def _context(body: dict, vocab: int) -> list[int]:
    context = body.get("context") or []
    if not (isinstance(context, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                              for i in context)):
        raise BadRequest([("context", f"context must be a list of token ids in [0, {vocab}) from an earlier reply")])
    return context


def generate_prompt(model: LoadedModel, body: dict) -> Prompt:
    llm = model.llm
    tok = llm.tokenizer
    prompt, suffix = text_field(body, "prompt"), text_field(body, "suffix")
    system = text_field(body, "system") or model.system
    template = text_field(body, "template")
    context = _context(body, llm.config.vocab_size)
    if suffix:
        ids = fim_prompt(model, prompt, suffix)
    elif flag(body, "raw", False):
        # raw: the client wrote the whole prompt, special tokens included (as in Ollama).
        ids = tok.encode(prompt, bos=llm.add_bos and not context, allow_special=True)
    else:
        fmt = _template_format(model, template) if template else llm.chat_format
        if fmt is None:  # no chat template: the prompt as it is (Ollama's "{{ .Prompt }}"); system is dropped
            ids = tok.encode(prompt, bos=llm.add_bos)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = fmt.encode_dialog(messages, add_generation_prompt=True)
    if context and ids and ids[0] == tok.bos_id:
        ids = ids[1:]  # the context already starts the sequence
    return Prompt(context + ids, text=prompt)


@router.post("/generate")
async def generate(request: Request) -> Response:
    body = await read_body(request)
    refuse_unsupported(body)
    stream = flag(body, "stream", True)
    if not text_field(body, "prompt") and not text_field(body, "suffix"):
        return await load_or_unload(get_state(request), body.get("model"), parse_keep_alive(body.get("keep_alive")),
                                    chat=False)
    chars = text_chars([text_field(body, k) for k in ("prompt", "suffix", "system", "template")])
    model, name, started, load_s = await hold_model(request, body)
    answer = await start(request, body, model, name, chars, lambda: generate_prompt(model, body), started, load_s)
    return await respond(request, answer.gen, GenerateReply(answer), stream)


# -- /api/chat -------------------------------------------------------------------------------------
def _message(m: Any, i: int) -> dict:
    """An Ollama message -> the chat format's dict ("tool_name" is Ollama's name for the answered tool)."""
    if not isinstance(m, dict):
        raise BadRequest([("messages", f"messages[{i}] must be an object")])
    no_images(m.get("images"), f"messages[{i}].images")
    out = {k: m[k] for k in ("role", "content", "tool_calls", "name", "tool_call_id") if m.get(k) is not None}
    if m.get("tool_name") is not None:
        out["name"] = m["tool_name"]
    return out


def chat_prompt(model: LoadedModel, messages: list, tools: list | None) -> Prompt:
    fmt = model.llm.chat_format
    if fmt is None:
        raise BadRequest([("model", f"{model.name} has no chat template; use /api/generate")])
    msgs = chat_messages(model, [_message(m, i) for i, m in enumerate(messages)])
    if tools:
        msgs, tools = with_tool_prompt(fmt, msgs, tools)
    return Prompt(fmt.encode_dialog(msgs, add_generation_prompt=True, tools=tools or None), msgs)


@router.post("/chat")
async def chat(request: Request) -> Response:
    body = await read_body(request)
    messages, tools = body.get("messages") or [], body.get("tools") or None
    if not isinstance(messages, list):
        raise BadRequest([("messages", "messages must be a list")])
    if tools is not None and not isinstance(tools, list):
        raise BadRequest([("tools", "tools must be a list")])
    refuse_unsupported(body)
    stream = flag(body, "stream", True)
    if not messages:
        return await load_or_unload(get_state(request), body.get("model"), parse_keep_alive(body.get("keep_alive")),
                                    chat=True)
    model, name, started, load_s = await hold_model(request, body)
    answer = await start(request, body, model, name, text_chars(messages), lambda: chat_prompt(model, messages, tools),
                         started, load_s)
    return await respond(request, answer.gen, ChatReply(answer, tools=bool(tools)), stream)


@router.get("/version")
async def version() -> dict:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return {"version": package_version("corral")}
    except PackageNotFoundError:
        return {"version": "0.0.0"}


def _include() -> None:
    """The model routes under /api, and the registry's /v2/... routes with their own full paths."""
    from corral.server import ollama_models, ollama_registry

    router.include_router(ollama_models.router)
    router.include_router(ollama_registry.api_router)
    # Routes keep the path they were made with; appending them here puts /v2/... beside /api/... in one router.
    router.routes.extend(ollama_registry.registry_router.routes)


_include()
