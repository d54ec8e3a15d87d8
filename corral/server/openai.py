"""The OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings.

A generation request runs: body -> schemas.parse_* (one 400 for every bad field) -> pool.get
(loads the model) -> prompt ids -> checks against the model (context, vocabulary) -> Scheduler.submit
(503 at once when full) -> events -> one JSON answer, or SSE chunks ``data: {json}\\n\\n`` ending
with ``data: [DONE]``. The model is held from pool.get until the answer (or the stream) ends.

The lifecycle (hold, input filters, submit, output filters, cancel on disconnect, release) is
corral.server.generation's; this module parses OpenAI bodies and renders the Deltas it yields.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request

from corral.errors import ChatFormatError, CorralError
from corral.server import embeddings, generation, toolcalls
from corral.server.errors import BadRequest, sse_error_frame
from corral.server.generation import (
    Generation,
    GenerationStream,
    Prompt,
    chat_messages,
    check_prompt_size,
    merged,
    released_on_error,
    text_chars,
)
from corral.server.pool import LoadedModel
from corral.server.schemas import ChatRequest, CompletionRequest, Sampling, parse_chat, parse_completion, parse_json
from corral.server.state import ServerState, get_state

router = APIRouter()
router.include_router(embeddings.router)  # /v1/models, /v1/embeddings
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


# -- rendering ---------------------------------------------------------------------------------------

def logprob_entry(tokenizer, choice) -> dict:
    def item(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {**item(choice.token, choice.logprob), "top_logprobs": [item(t, lp) for t, lp in (choice.top or [])]}


def prompt_logprobs(llm, ids: list[int], top: int) -> list[dict]:
    """Entries for an echoed prompt: each token's log p given the tokens before it (None for the first)."""
    import torch

    with torch.inference_mode():
        logp = llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, vocab): row t predicts token t+1
    entries = [{"token": llm.tokenizer.decode_bytes([ids[0]]).decode("utf-8", "replace"), "logprob": None,
                "top_logprobs": []}]
    for t in range(1, len(ids)):
        best = logp[t - 1].topk(top) if top else None
        alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
        entries.append(logprob_entry(llm.tokenizer, _Scored(ids[t], logp[t - 1, ids[t]].item(), alternatives)))
    return entries


@dataclass
class _Scored:
    token: int
    logprob: float
    top: list


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def event_stream(gen: Generation, frames: AsyncIterator[str]) -> GenerationStream:
    return GenerationStream([gen], frames, "text/event-stream", SSE_HEADERS)


# -- /v1/chat/completions -------------------------------------------------------------------------------

@dataclass
class ChatPlan:
    ids: list[int]
    messages: list
    """The dialog as rendered (the stored SYSTEM first, tool list folded in): what input filters read."""
    tools: list[dict] | None
    """Tools whose calls are parsed from the reply (None: plain text)."""
    forced: bool
    constraint: object | None


def plan_chat(model: LoadedModel, req: ChatRequest) -> ChatPlan:
    fmt = model.llm.chat_format
    if fmt is None:
        raise BadRequest(f"model {model.name} carries no chat template; use /v1/completions", param="model")
    messages = chat_messages(model, req.messages)
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
    return ChatPlan(ids, messages, tools, forced, constraint)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = get_state(request)
    req = parse_chat(await read_json(request))
    model = await checked_model(state, req)
    with released_on_error(state, model):
        await check_prompt_size(model, text_chars(req.messages), "messages")
        plan = await asyncio.to_thread(plan_chat, model, req)
        gen = submit_request(state, model, req, Prompt(plan.ids, plan.messages), "messages", plan.constraint)
    name = req.model or model.name
    if req.stream:
        return event_stream(gen, chat_stream(gen, plan, name, req.include_usage))
    await gen.wait(request)
    choices = [chat_choice(gen, plan, i) for i in range(len(gen.samples))]
    return {"id": f"chatcmpl-{gen.id}", "object": "chat.completion", "created": gen.created, "model": name,
            "system_fingerprint": f"corral-{model.digest[7:19]}", "choices": choices, "usage": gen.usage()}


def chat_choice(gen: Generation, plan: ChatPlan, i: int) -> dict:
    s = gen.samples[i]
    message: dict = {"role": "assistant", "content": s.text}
    finish = s.finish
    if plan.tools:
        reply = gen.model.llm.chat_format.parse_reply(s.text)
        if reply.tool_calls:
            message = {"role": "assistant", "content": reply.content or None,
                       "tool_calls": toolcalls.openai_tool_calls(reply.tool_calls)}
            finish = "tool_calls"
    tokenizer = gen.model.llm.tokenizer
    return {"index": i, "message": message, "finish_reason": finish,
            "logprobs": {"content": [logprob_entry(tokenizer, c) for c in s.choices]} if gen.logprobs else None,
            **gen.extras(i)}


async def chat_stream(gen: Generation, plan: ChatPlan, name: str, include_usage: bool) -> AsyncIterator[str]:
    base = {"id": f"chatcmpl-{gen.id}", "object": "chat.completion.chunk", "created": gen.created, "model": name}
    tokenizer, fmt = gen.model.llm.tokenizer, gen.model.llm.chat_format

    def chunk(i: int, delta: dict, finish: str | None = None, choice=None) -> str:
        lp = {"content": [logprob_entry(tokenizer, choice)] if choice is not None else []} if gen.logprobs else None
        extras = gen.extras(i) if finish is not None else {}  # filters' reports ride on the last chunk
        return sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish,
                                         **extras}]})

    holds = [toolcalls.CallFilter(plan.forced) for _ in gen.samples] if plan.tools else None
    for i in range(len(gen.samples)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for d in gen.deltas():
        if d.finish == "error":
            yield sse_error_frame(gen.error())
            break
        text = holds[d.index].push(d.text) if holds else d.text
        delta = {"content": text} if text else {}
        if d.finish is None:
            yield chunk(d.index, delta, None, d.choice)
            continue
        finish = d.finish
        if holds:
            reply = fmt.parse_reply(gen.samples[d.index].text)
            held = holds[d.index].finish()
            if reply.tool_calls:
                delta = {"tool_calls": toolcalls.openai_tool_calls(reply.tool_calls, streaming=True)}
                finish = "tool_calls"
            elif held:
                delta = {"content": delta.get("content", "") + held}
        if delta or d.choice is not None:
            yield chunk(d.index, delta, None, d.choice)
        yield chunk(d.index, {}, finish)
    else:
        if include_usage:
            yield sse({**base, "choices": [], "usage": gen.usage()})
    yield "data: [DONE]\n\n"


# -- /v1/completions --------------------------------------------------------------------------------------

def completion_ids(model: LoadedModel, prompt: str | list[int], index: int | None) -> list[int]:
    llm = model.llm
    if isinstance(prompt, str):
        return llm.tokenizer.encode(prompt, bos=llm.add_bos)
    vocab = llm.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        where = "prompt" if index is None else f"prompt[{index}]"
        raise BadRequest(f"{where}: token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
    return list(prompt)


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
    """One prompt, or a list of them (LangChain's batch): each prompt is its own generation, submitted
    together so the engine decodes them in one batch; choice i*n + j is sample j of prompt i."""
    state = get_state(request)
    req = parse_completion(await read_json(request))
    model = await checked_model(state, req)
    gens: list[Generation] = []
    with released_on_error(state, model):
        await check_prompt_size(model, max(text_chars([p]) for p in req.prompts), "prompt")
        indexed = len(req.prompts) > 1
        ids = await asyncio.to_thread(lambda: [completion_ids(model, p, i if indexed else None)
                                               for i, p in enumerate(req.prompts)])
        try:
            for i, prompt_ids in enumerate(ids):
                if i:
                    state.pool.hold(model)  # each generation gives back its own hold
                text = req.prompts[i] if isinstance(req.prompts[i], str) else None
                gens.append(submit_request(state, model, req, Prompt(prompt_ids, text=text), "prompt", None))
        except BaseException:
            for g in gens:  # each running one gives back its hold; released_on_error gives back the last
                g.end()
            raise
    name = req.model or model.name
    echoes = [(p if isinstance(p, str) else model.llm.tokenizer.decode(i)) if req.echo else ""
              for p, i in zip(req.prompts, ids)]
    if req.stream:
        return GenerationStream(gens, completion_stream(gens, name, echoes, req.include_usage),
                                "text/event-stream", SSE_HEADERS)
    await asyncio.gather(*(g.wait(request) for g in gens))
    tokenizer = model.llm.tokenizer
    # echo + logprobs: the prompt's own tokens are scored too (what log-likelihood evaluation asks for)
    echoed = [await asyncio.to_thread(prompt_logprobs, model.llm, i, req.sampling.logprobs)
              if req.echo and gens[0].logprobs else [] for i in ids]
    choices = [{"index": k * len(g.samples) + i, "text": echo + s.text, "finish_reason": s.finish,
                "logprobs": legacy_logprobs(prompt + [logprob_entry(tokenizer, c) for c in s.choices],
                                            len(echo) if not prompt else 0)
                if g.logprobs else None, **g.extras(i)}
               for k, (g, echo, prompt) in enumerate(zip(gens, echoes, echoed)) for i, s in enumerate(g.samples)]
    return {"id": f"cmpl-{gens[0].id}", "object": "text_completion", "created": gens[0].created, "model": name,
            "choices": choices, "usage": batch_usage(gens)}


def batch_usage(gens: list[Generation]) -> dict:
    p, c = sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def completion_stream(gens: list[Generation], name: str, echoes: list[str],
                            include_usage: bool) -> AsyncIterator[str]:
    base = {"id": f"cmpl-{gens[0].id}", "object": "text_completion", "created": gens[0].created, "model": name}
    n = len(gens[0].samples)
    offsets = [len(echo) for echo in echoes for _ in range(n)]
    tokenizer = gens[0].model.llm.tokenizer

    def chunk(i: int, text: str, finish: str | None, choice) -> str:
        entries = [logprob_entry(tokenizer, choice)] if choice is not None else []
        lp = legacy_logprobs(entries, offsets[i]) if gens[0].logprobs else None
        offsets[i] += len(text)
        extras = gens[i // n].extras(i % n) if finish is not None else {}
        return sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish,
                                         **extras}]})

    for k, echo in enumerate(echoes):
        for i in range(n if echo else 0):
            yield sse({**base, "choices": [{"index": k * n + i, "text": echo, "logprobs": None,
                                            "finish_reason": None}]})
    async for k, d in merged(gens):
        if d.finish == "error":
            yield sse_error_frame(gens[k].error())
            break
        yield chunk(k * n + d.index, d.text, d.finish, d.choice)
    else:
        if include_usage:
            yield sse({**base, "choices": [], "usage": batch_usage(gens)})
    yield "data: [DONE]\n\n"


def submit_request(state, model, req, prompt: Prompt, field: str, constraint) -> Generation:
    """Checked sampling parameters for these prompt ids, then the generation (input filters, ticket)."""
    params = sampling_params(model, req.sampling, len(prompt.ids), field)
    return generation.start(state, model, prompt, params, stop=stop_strings(model, req.sampling),
                            constraint=constraint, logprobs=req.sampling.logprobs is not None)
