"""One generation, whatever the dialect: hold -> input filters -> submit -> stream through the output
filters -> finish -> release. openai.py and ollama.py only parse requests and render what comes out.

    model = await state.pool.get(...)                 # the dialect holds the model
    with released_on_error(state, model):             # ... and hands it back if anything fails before
        gen = start(state, model, Prompt(ids, messages), params, stop=..., constraint=...)
    # non-streaming                                   # streaming
    await gen.wait(request)                           return GenerationStream(gen, render(gen.deltas()), ...)
    gen.samples[i].text, .finish                      async for d in gen.deltas(): yield frame(d)

A Generation owns the held model from `start` on and gives it back exactly once (`end`), whichever
way the request ends: finished, failed, or a client that left. Leaving is noticed the same way for
both dialects: a streaming answer is a GenerationStream, whose `__call__` ends the generation even when
the client left before the first byte (Starlette never starts the body then); a non-streaming one
polls `request.is_disconnected()` while it waits. Either way the ticket is cancelled and its slot is
free at the engine's next step (RELIABILITY 23, 42).

Stream filters (`state.filters`) are where moderation and code scanners plug in. Each one may refuse
the input before anything is submitted (`check_input` -> Cut), and gives every sample an output
filter that passes text on, rewrites it, holds it back (returns "" and gives it back at `finish`), or
cuts the sample with a Cut: the client sees the Cut's message, then the Cut's reason as the finish
reason, and the engine stops that sample (RELIABILITY 36: a cut stream never delivers the cut text).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from corral.server.errors import BadRequest, HTTPError
from corral.server.pool import LoadedModel

DISCONNECT_POLL_S = 0.2


# -- stream filters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cut:
    """Stop here: `reason` becomes the finish reason ("content_filter"), `message` the last text sent."""

    reason: str
    message: str = ""


@dataclass
class Prompt:
    """What a generation is asked: the token ids, and the dialog or text they came from (for input checks)."""

    ids: list[int]
    messages: list[dict] | None = None
    text: str | None = None


class OutputFilter(Protocol):
    """One sample's output check; `push` sees each piece of text in order, `finish` once at the end."""

    def push(self, text: str) -> str | Cut: ...

    def finish(self) -> str | Cut: ...


class StreamFilter(Protocol):
    def check_input(self, prompt: Prompt) -> Cut | None: ...

    def output(self) -> OutputFilter | None:
        """A fresh output filter for one sample (None: this filter does not look at output)."""
        ...


def through(filters: Sequence[OutputFilter], text: str, final: bool) -> str | Cut:
    """text through each filter in turn; at the end, what a filter held back goes on to the next one."""
    for f in filters:
        out = f.push(text)
        if isinstance(out, Cut):
            return out
        if final:
            tail = f.finish()
            if isinstance(tail, Cut):
                return tail
            out += tail
        text = out
    return text


# -- messages ----------------------------------------------------------------------------------------

def chat_messages(model: LoadedModel, messages: list) -> list:
    """A client's dialog as the chat format takes it: OpenAI's "developer" role is "system" (newer SDKs
    send it), image parts are refused by name, and the model's stored SYSTEM leads when no system
    message does."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            if m.get("role") == "developer":
                m = {**m, "role": "system"}
            content = m.get("content")
            if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS
                                                 for p in content):
                raise BadRequest(f"messages[{i}].content: images are not supported (text parts only)",
                                 param="messages")
        out.append(m)
    if model.system and not any(isinstance(m, dict) and m.get("role") == "system" for m in out):
        out.insert(0, {"role": "system", "content": model.system})
    return out


IMAGE_PARTS = ("image_url", "image", "input_image")


# -- prompt size before tokenizing -------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def longest_token(tokenizer) -> int:
    """Bytes of the vocabulary's longest token, special tokens' text included: no token covers more
    characters than that (a character is at least one byte). Found once per tokenizer (~0.2 s for 128k)."""
    plain = max(len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size))
    return max(plain, *(len(t) for t in tokenizer.special_tokens), 1)


def text_chars(messages_or_texts) -> int:
    """Characters of the text a prompt is made of: strings, and the content (string or text parts) of messages."""
    total = 0
    for m in messages_or_texts:
        content = m.get("content") if isinstance(m, dict) else m
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict)
                         and isinstance(p.get("text"), str))
    return total


async def check_prompt_size(model: LoadedModel, chars: int, field: str) -> None:
    """A prompt of more characters than context x longest token cannot fit: a 400 before it is tokenized
    (an 8 MB prompt would take seconds of tokenizer time only to be refused)."""
    longest = await asyncio.to_thread(longest_token, model.llm.tokenizer)
    if chars > model.context_length * longest:
        raise BadRequest(f"{field} has {chars} characters; the model's context of {model.context_length} tokens "
                         f"holds at most {model.context_length * longest} (shorten the prompt)", param=field,
                         code="context_length_exceeded")


# -- one generation ----------------------------------------------------------------------------------

@dataclass
class Sample:
    """What one of the n samples has shown the client so far (after the output filters)."""

    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    choices: list = field(default_factory=list)
    """The engine's Choice (token, logprob, top) of each counted token, when logprobs were asked for."""
    finish: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class Delta:
    """One event as the client should see it: text after the filters; finish set on a sample's last one."""

    index: int
    text: str
    choice: Any = None
    """The token's corral.engine.sampling.Choice when logprobs were asked for (None otherwise)."""
    finish: str | None = None
    error: str | None = None


class Generation:
    """A submitted request: the held model, its ticket (None when an input filter cut it), and the samples."""

    def __init__(self, state, model: LoadedModel, prompt: Prompt, ticket, n: int, filters: Sequence[StreamFilter],
                 *, logprobs: bool, refused: Cut | None = None):
        self.state, self.model, self.prompt, self.ticket = state, model, prompt, ticket
        self.refused = refused
        """The Cut of the input filter that refused the prompt (then ticket is None)."""
        self.samples = [Sample() for _ in range(n)]
        self.outputs = [[o for f in filters if (o := f.output()) is not None] for _ in range(n)]
        self.logprobs = logprobs
        self.stop_ids = model.llm.stop_ids
        self.id = secrets.token_hex(12)
        self.created = int(time.time())
        self.first_token_at: float | None = None
        self._held = True

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)

    @property
    def completion_tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def output_ids(self, index: int = 0) -> list[int]:
        return list(self.ticket.requests[index].output) if self.ticket is not None and self.ticket.requests else []

    def timings(self, index: int = 0) -> dict:
        return dict(self.ticket.requests[index].timings) if self.ticket is not None and self.ticket.requests else {}

    def extras(self, index: int) -> dict:
        """Fields the output filters add to sample `index`'s response (an OutputFilter with a `report()`,
        e.g. Code Shield's {"code_shield": {...}}); clients ignore fields they do not know."""
        out: dict = {}
        for o in self.outputs[index] if self.refused is None else ():
            if (report := getattr(o, "report", None)) is not None:
                out.update(report())
        return out

    def error(self) -> HTTPError | None:
        errors = [s.error for s in self.samples if s.finish == "error"]
        return HTTPError(f"generation failed: {errors[0] or 'engine error'}", status=500, code="engine_error") \
            if errors else None

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every sample's events through the output filters, until each sample has finished."""
        if self.refused is not None:  # nothing was submitted: each sample is the Cut alone
            for i in range(len(self.samples)):
                yield self._record(i, self.refused.message, None, self.refused.reason)
            return
        async for ev in self.ticket.events():
            s = self.samples[ev.index]
            if s.finish is not None:
                continue  # the rest of a sample a filter cut
            choice = self._count(s, ev)
            if ev.finish_reason == "error":
                s.error = ev.error or self.ticket.error
                yield self._record(ev.index, "", None, "error", s.error)
                continue
            out = through(self.outputs[ev.index], ev.text, ev.finish_reason is not None)
            if isinstance(out, Cut):
                self._cut(ev.index)
                yield self._record(ev.index, out.message, choice, out.reason)
            elif out or choice is not None or ev.finish_reason is not None:
                yield self._record(ev.index, out, choice, ev.finish_reason)

    def _count(self, s: Sample, ev) -> Any:
        counted = ev.token >= 0 and not (ev.finish_reason == "stop" and ev.token in self.stop_ids)
        if not counted:
            return None
        s.tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return ev.logprob if self.logprobs else None

    def _record(self, index: int, text: str, choice, finish: str | None, error: str | None = None) -> Delta:
        s = self.samples[index]
        if text:
            s.parts.append(text)
        if choice is not None:
            s.choices.append(choice)
        s.finish, s.error = finish, error
        return Delta(index, text, choice, finish, error)

    def _cut(self, index: int) -> None:
        """Stop a sample a filter cut: the whole ticket once every sample is done, else that sample."""
        if all(s.finish is not None for i, s in enumerate(self.samples) if i != index):
            self.ticket.cancel()
        else:
            self.ticket.cancel_sample(index)

    async def wait(self, request: Request) -> None:
        """Run a non-streamed request to its end (a client that leaves cancels it); an engine failure raises."""
        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            if self.ticket is not None:
                self.ticket.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for _ in self.deltas():
                pass
        finally:
            watcher.cancel()
            self.end()
        if (err := self.error()) is not None:
            raise err

    def end(self) -> None:
        """Cancel what still runs, record metrics, give the model back to the pool (idempotent)."""
        if not self._held:
            return
        self._held = False
        if self.ticket is not None:
            self.ticket.cancel()  # a no-op once every sample finished
            decode_s = time.perf_counter() - self.first_token_at if self.first_token_at else None
            self.state.metrics.record_generation(self.model.name, self.prompt_tokens, self.completion_tokens,
                                                 self.ticket.first_token_s, decode_s)
        self.state.pool.release(self.model)


def start(state, model: LoadedModel, prompt: Prompt, params, *, stop: Sequence[str] = (), constraint=None,
          logprobs: bool = False) -> Generation:
    """Input filters, then the scheduler's ticket (QueueFullError -> 503 at once). The caller still holds
    the model until this returns (see released_on_error); from then on the Generation does."""
    filters = list(state.filters)
    for f in filters:
        cut = f.check_input(prompt)
        if cut is not None:
            return Generation(state, model, prompt, None, params.n, [], logprobs=logprobs, refused=cut)
    ticket = model.scheduler.submit(prompt.ids, params, stop=stop, constraint_factory=constraint)
    return Generation(state, model, prompt, ticket, params.n, filters, logprobs=logprobs)


@contextlib.contextmanager
def released_on_error(state, model: LoadedModel):
    """Hand the model back to the pool if anything fails before its generation has started."""
    try:
        yield
    except BaseException:
        state.pool.release(model)
        raise


async def merged(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Delta]]:
    """(k, delta) from several generations as they come (a batch of prompts); k says whose."""
    if len(gens) == 1:
        async for d in gens[0].deltas():
            yield 0, d
        return
    box: asyncio.Queue = asyncio.Queue()

    async def pump(k: int) -> None:
        try:
            async for d in gens[k].deltas():
                await box.put((k, d))
        finally:
            await box.put((k, None))

    tasks = [asyncio.create_task(pump(k)) for k in range(len(gens))]
    try:
        left = len(gens)
        while left:
            k, d = await box.get()
            if d is None:
                left -= 1
            else:
                yield k, d
    finally:
        for task in tasks:
            task.cancel()


class GenerationStream(StreamingResponse):
    """A streamed answer that always ends its generations, even when the client is gone before the first byte
    is sent (then Starlette never starts the body, so a generator's own ``finally`` would never run)."""

    def __init__(self, gens: Sequence[Generation], content: AsyncIterator[str | bytes], media_type: str,
                 headers: dict | None = None):
        super().__init__(content, media_type=media_type, headers=headers)
        self.gens = list(gens)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for gen in self.gens:
                gen.end()
