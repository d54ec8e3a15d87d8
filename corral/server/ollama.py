"""The Ollama dialect: ``/api/generate`` and ``/api/chat`` here; the model routes (tags, show, ps, create,
copy, delete, blobs, embed) in ollama_models.py; pull, push and the ``/v2/`` registry in ollama_registry.py.

A generation is: read the body -> pool.get(model) -> token ids (template, system, context, FIM) ->
options -> scheduler.submit -> NDJSON lines (``application/x-ndjson``, the default) or one JSON object:

    {"model", "created_at", "response": "<text>", "done": false}            (chat: "message": {...})
    {"model", "created_at", "response": "", "done": true, "done_reason": "stop" | "length",
     "context": [ids] (generate only), "total_duration", "load_duration", "prompt_eval_count",
     "prompt_eval_duration", "eval_count", "eval_duration"}                  (durations in nanoseconds)

Errors before the first line are a status + ``{"error": "..."}``; an engine failure mid-stream is a
final ``{"error": "..."}`` line (RELIABILITY 24). A client that goes away cancels its request, which
frees its cache slot at the engine's next step (RELIABILITY 23).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.server.errors import BadRequest, HTTPError
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


# -- one generation ----------------------------------------------------------------------------------
class GenerationFailed(Exception):
    """The engine failed mid-request; the message goes out as the final {"error"} line."""


@dataclass
class Job:
    state: ServerState
    model: LoadedModel
    name: str
    """The model name as the client gave it (Ollama echoes it back)."""
    ticket: Any
    prompt: list[int]
    started: float
    load_s: float
    _finished: bool = False

    def output(self) -> list[int]:
        return list(self.ticket.requests[0].output) if self.ticket.requests else []

    def stats(self) -> dict[str, Any]:
        timings = self.ticket.requests[0].timings if self.ticket.requests else {}
        return {"total_duration": ns(time.perf_counter() - self.started), "load_duration": ns(self.load_s),
                "prompt_eval_count": len(self.prompt), "prompt_eval_duration": ns(timings.get("prefill_s")),
                "eval_count": len(self.output()), "eval_duration": ns(timings.get("decode_s"))}

    def finish(self) -> None:
        """Cancel whatever still runs (a client that left), release the model, count the tokens."""
        if self._finished:
            return
        self._finished = True
        self.ticket.cancel()
        timings = self.ticket.requests[0].timings if self.ticket.requests else {}
        self.state.metrics.record_generation(self.model.name, len(self.prompt), len(self.output()),
                                             self.ticket.first_token_s, timings.get("decode_s"))
        self.state.pool.release(self.model)

    def head(self) -> dict[str, Any]:
        return {"model": self.name, "created_at": now_iso()}


class GenerateReply:
    """Lines of /api/generate."""

    def __init__(self, job: Job):
        self.job = job

    def feed(self, text: str) -> list[dict]:
        return [{**self.job.head(), "response": text, "done": False}]

    def end(self, reason: str) -> list[dict]:
        return [{**self.job.head(), "response": "", "done": True, "done_reason": reason,
                 "context": self.job.prompt + self.job.output(), **self.job.stats()}]

    @staticmethod
    def merge(lines: list[dict]) -> dict:
        return {**lines[-1], "response": "".join(line["response"] for line in lines)}


class ChatReply:
    """Lines of /api/chat; with tools, text that may be a call is held back until the reply ends."""

    def __init__(self, job: Job, tools: bool):
        self.job = job
        self.filter = CallFilter() if tools else None
        self.text: list[str] = []

    def _line(self, message: dict) -> dict:
        return {**self.job.head(), "message": {"role": "assistant", **message}, "done": False}

    def feed(self, text: str) -> list[dict]:
        self.text.append(text)
        shown = self.filter.push(text) if self.filter else text
        return [self._line({"content": shown})] if shown else []

    def end(self, reason: str) -> list[dict]:
        lines = []
        if self.filter is not None:
            parsed = self.job.model.llm.chat_format.parse_reply("".join(self.text))
            held = self.filter.finish()
            if parsed.tool_calls:
                calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in parsed.tool_calls]
                lines.append(self._line({"content": "", "tool_calls": calls}))
            elif held:
                lines.append(self._line({"content": held}))
        final = self._line({"content": ""})
        final.update(done=True, done_reason=reason, **self.job.stats())
        return [*lines, final]

    @staticmethod
    def merge(lines: list[dict]) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(x["message"]["content"] for x in lines)}
        calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
        if calls:
            message["tool_calls"] = calls
        return {**lines[-1], "message": message}


async def _lines(job: Job, reply: GenerateReply | ChatReply) -> AsyncIterator[dict]:
    reason = "stop"
    async for ev in job.ticket.events():
        if ev.finish_reason == "error":
            raise GenerationFailed(f"generation failed: {ev.error or 'engine error'}")
        if ev.text:
            for out in reply.feed(ev.text):
                yield out
        if ev.finish_reason is not None:
            reason = ev.finish_reason
    for out in reply.end(reason):
        yield out


async def _ndjson(job: Job, reply: GenerateReply | ChatReply) -> AsyncIterator[bytes]:
    try:
        async for out in _lines(job, reply):
            yield line(out)
    except GenerationFailed as exc:
        yield line({"error": str(exc)})
    finally:
        job.finish()  # also runs when the client disconnects: the stream is cancelled, the ticket with it


async def _watch_disconnect(request: Request, job: Job) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    job.ticket.cancel()


async def respond(request: Request, job: Job, reply: GenerateReply | ChatReply, stream: bool) -> Response:
    if stream:
        lines = _ndjson(job, reply)
        # A client gone before the first line may leave the generator unstarted, so its finally never
        # runs; finishing when it is collected still cancels the ticket and releases the model.
        weakref.finalize(lines, job.finish)
        return StreamingResponse(lines, media_type=NDJSON)
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        lines = [out async for out in _lines(job, reply)]
    except GenerationFailed as exc:
        raise HTTPError(str(exc), status=500) from None
    finally:
        watcher.cancel()
        job.finish()
    return JSONResponse(reply.merge(lines))


async def start(request: Request, body: dict, model: LoadedModel, name: str, ids: list[int], started: float,
                load_s: float) -> Job:
    """Options and format -> a submitted ticket (400s here, before any line is sent)."""
    state = get_state(request)
    llm = model.llm
    plan = parse_options(body.get("options"), model.options).plan(len(ids), model.context_length)
    # The first constraint of a tokenizer indexes its vocabulary (seconds): off the event loop.
    factory = await asyncio.to_thread(constraint_factory, body.get("format"), llm.tokenizer, llm.config.vocab_size)
    ticket = model.scheduler.submit(ids, plan.params, stop=plan.stop, constraint_factory=factory)
    return Job(state, model, name, ticket, ids, started, load_s)


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
    from corral.tokenizer.template import JinjaChatFormat

    tok = model.llm.tokenizer
    names = {i: t for t, i in tok.special_tokens.items()}
    return JinjaChatFormat(template, tok, bos_token=names.get(tok.bos_id, ""), eos_token=names.get(tok.eos_id, ""),
                           stop_ids=model.llm.stop_ids)


def _context(body: dict, vocab: int) -> list[int]:
    context = body.get("context") or []
    if not (isinstance(context, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                              for i in context)):
        raise BadRequest([("context", f"context must be a list of token ids in [0, {vocab}) from an earlier reply")])
    return context


def generate_prompt(model: LoadedModel, body: dict) -> list[int]:
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
    return context + ids


@router.post("/generate")
async def generate(request: Request) -> Response:
    body = await read_body(request)
    refuse_unsupported(body)
    stream = flag(body, "stream", True)
    if not text_field(body, "prompt") and not text_field(body, "suffix"):
        return await load_or_unload(get_state(request), body.get("model"), parse_keep_alive(body.get("keep_alive")),
                                    chat=False)
    model, name, started, load_s = await hold_model(request, body)
    try:
        # A `template` is client code: rendered in a worker thread within its budget, so it cannot stall the loop.
        ids = await asyncio.to_thread(generate_prompt, model, body)
        job = await start(request, body, model, name, ids, started, load_s)
    except BaseException:
        get_state(request).pool.release(model)
        raise
    return await respond(request, job, GenerateReply(job), stream)


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


def chat_prompt(model: LoadedModel, messages: list, tools: list | None) -> list[int]:
    fmt = model.llm.chat_format
    if fmt is None:
        raise BadRequest([("model", f"{model.name} has no chat template; use /api/generate")])
    msgs = [_message(m, i) for i, m in enumerate(messages)]
    if model.system and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": model.system})
    if tools:
        msgs, tools = with_tool_prompt(fmt, msgs, tools)
    return fmt.encode_dialog(msgs, add_generation_prompt=True, tools=tools or None)


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
    try:
        ids = await asyncio.to_thread(chat_prompt, model, messages, tools)  # the model's TEMPLATE, off the loop
        job = await start(request, body, model, name, ids, started, load_s)
    except BaseException:
        get_state(request).pool.release(model)
        raise
    return await respond(request, job, ChatReply(job, tools=bool(tools)), stream)


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
