"""The OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings.

A generation request runs: body -> schemas.parse_* (one 400 for every bad field) -> pool.get
(loads the model) -> prompt ids -> checks against the model (context, vocabulary) -> Scheduler.submit
(503 at once when full) -> events -> one JSON answer, or SSE chunks ``data: {json}\\n\\n`` ending
with ``data: [DONE]``. The model is held from pool.get until the answer (or the stream) ends.

Cancellation: a streaming client that goes away cancels the Ticket (Starlette cancels the
generator; its ``finally`` cancels). A non-streaming one is noticed by a watcher that polls
``request.is_disconnected()``. Either way the slot is free at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from corral.errors import ChatFormatError, CorralError
from corral.server import embeddings, toolcalls
from corral.server.errors import BadRequest, HTTPError, sse_error_frame
from corral.server.pool import LoadedModel
from corral.server.schemas import ChatRequest, CompletionRequest, Sampling, parse_chat, parse_completion, parse_json
from corral.server.state import ServerState, get_state

router = APIRouter()
router.include_router(embeddings.router)  # /v1/models, /v1/embeddings
DISCONNECT_POLL_S = 0.2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json(request: Request) -> dict:
    return parse_json(await request.body())


# -- checks and parameters that need the model -------------------------------------------------------

async def checked_model(state: ServerState, req: ChatRequest | CompletionRequest) -> LoadedModel:
    """The request's model, held, once every field is valid: one 400 lists the body's problems together
    with those only the model can tell (logit_bias ids against its vocabulary)."""
    problems = list(req.problems)
    if any(name == "model" for name, _ in problems):
        raise BadRequest(problems)
    model = await state.pool.get(req.model, req.keep_alive)
    vocab = model.llm.config.vocab_size
    bad_ids = [t for t in req.sampling.logit_bias if t >= vocab]
    if bad_ids:
        problems.append(("logit_bias", f"logit_bias token ids must be below the vocabulary size {vocab}, "
                                       f"got {bad_ids[:5]}"))
    if problems:
        state.pool.release(model)
        raise BadRequest(problems)
    return model


def sampling_params(model: LoadedModel, s: Sampling, prompt_tokens: int, prompt_field: str):
    """SamplingParams for a request: its fields, else the model's stored PARAMETERs, else the engine's defaults.

    Prompt + max_tokens must fit the context: over it is a 400 naming both (never a silent cut);
    without max_tokens the answer may run to the end of the context.
    """
    from corral.engine.sampling import SamplingParams
    from corral.store.modelfile import PARAMETERS

    ctx = model.context_length
    problems: list[tuple[str, str]] = []
    stored = {PARAMETERS[k][1]: v for k, v in model.options.items() if k in PARAMETERS and PARAMETERS[k][1]}
    fields = {k: v for k, v in stored.items() if k not in ("stop", "max_new_tokens")} | s.given()
    max_tokens = s.max_tokens
    if max_tokens is None:
        limit = stored.get("max_new_tokens")
        max_tokens = max(ctx - prompt_tokens, 1) if not limit or limit < 0 else min(limit, max(ctx - prompt_tokens, 1))
    if prompt_tokens >= ctx:
        problems.append((prompt_field, f"the prompt has {prompt_tokens} tokens; the model's context is {ctx} "
                                       "tokens (shorten the prompt)"))
    elif prompt_tokens + max_tokens > ctx:
        problems.append(("max_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                                       f"{prompt_tokens + max_tokens} is over the model's context of {ctx} tokens"))
    if problems:
        raise BadRequest(problems, code="context_length_exceeded")
    return SamplingParams(**fields, n=s.n, max_new_tokens=max_tokens, logit_bias=dict(s.logit_bias),
                          logprobs=s.logprobs)


def stop_strings(model: LoadedModel, s: Sampling) -> list[str]:
    stored = model.options.get("stop") or []
    return s.stop or ([stored] if isinstance(stored, str) else list(stored))


def json_constraint_factory(model: LoadedModel, schema: dict | None, param: str = "response_format"):
    """A fresh Constraint per sample (constrained decoding lives in corral.engine.constrain)."""
    from corral.engine.constrain import json_constraint

    llm = model.llm
    try:
        json_constraint(llm.tokenizer, schema, vocab_size=llm.config.vocab_size)  # a schema it refuses: 400 now
    except CorralError as exc:
        raise BadRequest(f"{param}: {exc}", param=param) from None
    return lambda: json_constraint(llm.tokenizer, schema, vocab_size=llm.config.vocab_size)


# -- running a ticket ---------------------------------------------------------------------------------

@dataclass
class Sample:
    """What one of the n samples produced so far."""

    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list = field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Run:
    """A submitted request: its model, ticket and per-sample results; records metrics when it ends."""

    def __init__(self, state: ServerState, model: LoadedModel, ticket, *, want_logprobs: bool):
        self.state, self.model, self.ticket = state, model, ticket
        self.samples = [Sample() for _ in range(ticket.n)]
        self.want_logprobs = want_logprobs
        self.stop_ids = model.llm.stop_ids
        self.fmt, self.tokenizer = model.llm.chat_format, model.llm.tokenizer
        self.first_token_at: float | None = None
        self.id = secrets.token_hex(12)
        self.created = int(time.time())

    def add(self, ev) -> tuple[Sample, dict | None]:
        """Record an event; the OpenAI logprob entry of its token (None when it has none to show)."""
        s = self.samples[ev.index]
        s.parts.append(ev.text)
        entry = None
        counted = ev.token >= 0 and not (ev.finish_reason == "stop" and ev.token in self.stop_ids)
        if counted:
            s.tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if self.want_logprobs and ev.logprob is not None:
                entry = logprob_entry(self.tokenizer, ev.logprob)
                s.logprobs.append(entry)
        if ev.finish_reason is not None:
            s.finish, s.error = ev.finish_reason, ev.error or self.ticket.error
        return s, entry

    @property
    def completion_tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def usage(self) -> dict:
        p, c = self.ticket.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def end(self) -> None:
        """Cancel what still runs, record metrics, release the model (idempotent)."""
        if self.model is None:
            return
        if any(s.finish is None for s in self.samples):
            self.ticket.cancel()
        decode_s = time.perf_counter() - self.first_token_at if self.first_token_at else None
        self.state.metrics.record_generation(self.model.name, self.ticket.prompt_tokens, self.completion_tokens,
                                             self.ticket.first_token_s, decode_s)
        self.state.pool.release(self.model)
        self.model = None

    def engine_error(self) -> HTTPError | None:
        errors = [s.error for s in self.samples if s.finish == "error"]
        return HTTPError(f"generation failed: {errors[0] or 'engine error'}", status=500, code="engine_error") \
            if errors else None


def logprob_entry(tokenizer, choice) -> dict:
    def item(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {**item(choice.token, choice.logprob), "top_logprobs": [item(t, lp) for t, lp in (choice.top or [])]}


async def collect(request: Request, run: Run) -> None:
    """Consume every event of a non-streaming request; a client that disconnects cancels it."""
    async def watch() -> None:
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                run.ticket.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        async for ev in run.ticket.events():
            run.add(ev)
    finally:
        watcher.cancel()


def submit(state: ServerState, model: LoadedModel, ids: list[int], params, stop, constraint, *,
           want_logprobs: bool) -> Run:
    ticket = model.scheduler.submit(ids, params, stop=stop, constraint_factory=constraint)
    return Run(state, model, ticket, want_logprobs=want_logprobs)


class TicketStream(StreamingResponse):
    """An SSE answer that always ends its Run, even when the client is gone before the first byte is sent
    (then Starlette never starts the generator, so the generator's own ``finally`` would never run)."""

    def __init__(self, run: Run, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.end()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- /v1/chat/completions -------------------------------------------------------------------------------

@dataclass
class ChatPlan:
    ids: list[int]
    tools: list[dict] | None
    """Tools whose calls are parsed from the reply (None: plain text)."""
    forced: bool
    constraint: object | None


def plan_chat(model: LoadedModel, req: ChatRequest) -> ChatPlan:
    fmt = model.llm.chat_format
    if fmt is None:
        raise BadRequest(f"model {model.name} carries no chat template; use /v1/completions", param="model")
    messages = list(req.messages)
    if model.system and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": model.system})
    tools = req.tools if req.tool_choice != "none" else None
    render_tools, constraint, forced = tools, None, False
    try:
        if tools:
            messages, render_tools = toolcalls.with_tool_prompt(fmt, messages, tools)
        ids = fmt.encode_dialog(messages, add_generation_prompt=True, tools=render_tools)
    except ChatFormatError as exc:
        raise BadRequest(str(exc), param="messages") from None
    if tools and req.tool_choice != "auto":
        name = req.tool_choice["function"]["name"] if isinstance(req.tool_choice, dict) else None
        constraint, forced = json_constraint_factory(model, toolcalls.call_schema(tools, name), "tools"), True
    elif req.response_format.kind == "json_object":
        constraint = json_constraint_factory(model, None)
    elif req.response_format.kind == "json_schema":
        constraint = json_constraint_factory(model, req.response_format.schema or {})
    return ChatPlan(ids, tools, forced, constraint)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = get_state(request)
    req = parse_chat(await read_json(request))
    model = await checked_model(state, req)
    with released_on_error(state, model):
        plan = await asyncio.to_thread(plan_chat, model, req)
        run = submit_request(state, model, req, plan.ids, "messages", plan.constraint)
    name = req.model or model.name
    if req.stream:
        return TicketStream(run, chat_stream(run, plan, name, req.include_usage))
    await run_to_end(request, run)
    choices = [chat_choice(run, plan, i) for i in range(len(run.samples))]
    return {"id": f"chatcmpl-{run.id}", "object": "chat.completion", "created": run.created, "model": name,
            "system_fingerprint": f"corral-{model.digest[7:19]}", "choices": choices, "usage": run.usage()}


def chat_choice(run: Run, plan: ChatPlan, i: int) -> dict:
    s = run.samples[i]
    message: dict = {"role": "assistant", "content": s.text}
    finish = s.finish
    if plan.tools:
        reply = run.fmt.parse_reply(s.text)
        if reply.tool_calls:
            message = {"role": "assistant", "content": reply.content or None,
                       "tool_calls": toolcalls.openai_tool_calls(reply.tool_calls)}
            finish = "tool_calls"
    return {"index": i, "message": message, "finish_reason": finish,
            "logprobs": {"content": s.logprobs} if run.want_logprobs else None}


async def chat_stream(run: Run, plan: ChatPlan, name: str, include_usage: bool) -> AsyncIterator[str]:
    base = {"id": f"chatcmpl-{run.id}", "object": "chat.completion.chunk", "created": run.created, "model": name}

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
        lp = {"content": logprobs} if run.want_logprobs and logprobs is not None else None
        return sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    filters = [toolcalls.CallFilter(plan.forced) for _ in run.samples] if plan.tools else None
    try:
        for i in range(len(run.samples)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in run.ticket.events():
            s, entry = run.add(ev)
            if ev.finish_reason == "error":
                yield sse_error_frame(run.engine_error())
                break
            text = filters[ev.index].push(ev.text) if filters else ev.text
            delta = {"content": text} if text else {}
            if ev.finish_reason is None:
                if delta or entry:
                    yield chunk(ev.index, delta, None, [entry] if entry else [])
                continue
            finish = ev.finish_reason
            if filters:
                reply = run.fmt.parse_reply(s.text)
                held = filters[ev.index].finish()
                if reply.tool_calls:
                    delta = {"tool_calls": toolcalls.openai_tool_calls(reply.tool_calls, streaming=True)}
                    finish = "tool_calls"
                elif held:
                    delta = {"content": delta.get("content", "") + held}
            if delta or entry:
                yield chunk(ev.index, delta, None, [entry] if entry else [])
            yield chunk(ev.index, {}, finish)
        else:
            if include_usage:
                yield sse({**base, "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"
    finally:
        run.end()


# -- /v1/completions --------------------------------------------------------------------------------------

def completion_ids(model: LoadedModel, req: CompletionRequest) -> list[int]:
    llm = model.llm
    if isinstance(req.prompt, str):
        return llm.tokenizer.encode(req.prompt, bos=llm.add_bos)
    vocab = llm.config.vocab_size
    bad = [t for t in req.prompt if not 0 <= t < vocab]
    if bad:
        raise BadRequest(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
    return list(req.prompt)


def legacy_logprobs(entries: list[dict], offset: int) -> dict:
    """The /v1/completions shape: parallel lists, top alternatives as {token: logprob}."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


@router.post("/v1/completions")
async def completions(request: Request):
    state = get_state(request)
    req = parse_completion(await read_json(request))
    model = await checked_model(state, req)
    with released_on_error(state, model):
        ids = await asyncio.to_thread(completion_ids, model, req)
        run = submit_request(state, model, req, ids, "prompt", None)
    name = req.model or model.name
    echo = (req.prompt if isinstance(req.prompt, str) else model.llm.tokenizer.decode(ids)) if req.echo else ""
    if req.stream:
        return TicketStream(run, completion_stream(run, name, echo, req.include_usage))
    await run_to_end(request, run)
    choices = [{"index": i, "text": echo + s.text, "finish_reason": s.finish,
                "logprobs": legacy_logprobs(s.logprobs, len(echo)) if run.want_logprobs else None}
               for i, s in enumerate(run.samples)]
    return {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created, "model": name,
            "choices": choices, "usage": run.usage()}


async def completion_stream(run: Run, name: str, echo: str, include_usage: bool) -> AsyncIterator[str]:
    base = {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created, "model": name}
    offsets = [len(echo)] * len(run.samples)

    def chunk(i: int, text: str, finish: str | None, entry: dict | None) -> str:
        lp = legacy_logprobs([entry] if entry else [], offsets[i]) if run.want_logprobs else None
        offsets[i] += len(text)
        return sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

    try:
        if echo:
            for i in range(len(run.samples)):
                yield sse({**base, "choices": [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}]})
        async for ev in run.ticket.events():
            _, entry = run.add(ev)
            if ev.finish_reason == "error":
                yield sse_error_frame(run.engine_error())
                break
            if ev.text or entry or ev.finish_reason:
                yield chunk(ev.index, ev.text, ev.finish_reason, entry)
        else:
            if include_usage:
                yield sse({**base, "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"
    finally:
        run.end()


async def run_to_end(request: Request, run) -> None:
    """Wait for a non-streamed request to finish; an engine failure becomes this request's error."""
    try:
        await collect(request, run)
    finally:
        run.end()
    if (err := run.engine_error()) is not None:
        raise err


@contextlib.contextmanager
def released_on_error(state, model):
    """Hand the model back to the pool if anything fails before its request is running."""
    try:
        yield
    except BaseException:
        state.pool.release(model)
        raise


def submit_request(state, model, req, ids: list[int], field: str, constraint) -> Run:
    """Checked sampling parameters for these prompt ids, then the engine's ticket (Run)."""
    params = sampling_params(model, req.sampling, len(ids), field)
    return submit(state, model, ids, params, stop_strings(model, req.sampling), constraint,
                  want_logprobs=req.sampling.logprobs is not None)
