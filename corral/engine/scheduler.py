"""Continuous batching for a server: one worker thread drives the Engine; asyncio handlers talk to it.

The engine is single-threaded by design (its slots, cache and queues are plain Python state), so
exactly one thread, the worker, ever touches it. Handlers on the event loop `submit` and `cancel`
through an inbox the worker drains between steps; the worker hands each step's tokens back to the
loop that asked (`call_soon_threadsafe`). So a request joins the running batch at the next decode
step, and a cancelled one leaves it (and frees its slot) at the next step too.

    ticket = scheduler.submit(ids, SamplingParams(max_new_tokens=64))   # QueueFullError at once if full
    async for ev in ticket.events():                                      # TicketEvent per token
        send(ev.text)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.engine.engine import Completion, Engine, Request, completion
from corral.engine.sampling import Choice, SamplingParams
from corral.errors import CorralError

log = logging.getLogger("corral.scheduler")


class QueueFullError(CorralError):
    """Every slot is busy and the queue is full; the server answers 503 at once instead of waiting."""


@dataclass
class TicketEvent:
    index: int
    """Which of the ticket's n samples this is."""
    token: int
    text: str
    logprob: Choice | None = None
    finish_reason: str | None = None
    """Set on the last event of a sample: "stop", "length", "cancelled" or "error"."""
    error: str | None = None


@dataclass(eq=False)  # compared and hashed by identity: the worker keeps sets of tickets
class Ticket:
    """One submitted prompt: its params.n requests and the events they produce."""

    n: int
    prompt_tokens: int
    _scheduler: Scheduler
    _loop: asyncio.AbstractEventLoop | None
    _queue: asyncio.Queue | queue.Queue
    requests: list[Request] = field(default_factory=list)
    """Filled in by the worker once the engine takes the prompt."""
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    error: str | None = None
    _cancelled: bool = False
    _done: int = 0  # samples whose last event the reader has taken

    def cancel(self) -> None:
        """Stop every sample (thread-safe); slots are freed at the engine's next step, and a prefill
        running now stops at its next layer (Request.abort)."""
        if not self._cancelled:
            self._cancelled = True
            for req in list(self.requests):
                req.abort = True
            self._scheduler._post(("cancel", self))

    def cancel_sample(self, index: int) -> None:
        """Stop one of the n samples (a stream filter cut it); the others go on."""
        if not self._cancelled:
            if index < len(self.requests):
                self.requests[index].abort = True
            self._scheduler._post(("cancel", self, index))

    async def events(self) -> AsyncIterator[TicketEvent]:
        """Events in order until all n samples are done; leaving the loop early cancels the rest."""
        try:
            while self._done < self.n:
                yield self._counted(await self._queue.get())
        finally:
            self._cancel_unfinished()

    def iter_events(self, timeout: float | None = None):
        """The same events for a caller without an event loop (tests, scripts)."""
        try:
            while self._done < self.n:
                yield self._counted(self._queue.get(timeout=timeout))
        finally:
            self._cancel_unfinished()

    def _counted(self, event: TicketEvent) -> TicketEvent:
        self._done += event.finish_reason is not None
        return event

    def _cancel_unfinished(self) -> None:
        if self._done < self.n:
            self.cancel()

    async def completions(self) -> list[Completion]:
        """Wait for all n samples; cancelling the awaiting task cancels them."""
        async for _ in self.events():
            pass
        return [completion(r) for r in self.requests]


class Scheduler:
    """Drives one Engine from a worker thread; parallel slots = the engine's max_batch_size."""

    def __init__(self, engine: Engine, *, max_queue: int = 64, on_step: Callable[[int, float], None] | None = None):
        self.engine = engine
        self.slots = len(engine.slots)
        self.max_queue = max_queue
        self.on_step = on_step
        """Called after each step with (tokens produced, seconds): the server's metrics hook."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._active = 0  # requests submitted and not yet finished (running + queued)
        self._owner: dict[int, tuple[Ticket, int]] = {}  # request id -> (ticket, sample index); worker only
        self._closed = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="corral-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ----------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, *, stop: Sequence[str] = (),
               constraint_factory: Callable[[], Any] | None = None) -> Ticket:
        """Queue a prompt. Bad input raises the engine's RequestError now; a full queue, QueueFullError."""
        if self._closed:
            raise QueueFullError("the model is being unloaded; retry")
        prompt = self.engine.check_prompt(prompt, params)  # pure checks: safe off the worker thread
        with self._lock:
            if self._active + params.n > self.slots + self.max_queue:
                raise QueueFullError(f"server busy: {self._active} requests running or queued "
                                     f"({self.slots} slots + a queue of {self.max_queue}); retry later")
            self._active += params.n
        try:
            loop = asyncio.get_running_loop()
            box: asyncio.Queue | queue.Queue = asyncio.Queue()
        except RuntimeError:
            loop, box = None, queue.Queue()
        ticket = Ticket(params.n, len(prompt), self, loop, box)
        self._post(("submit", ticket, prompt, params, tuple(stop), constraint_factory))
        return ticket

    @property
    def running(self) -> int:
        """Requests holding a slot now."""
        return sum(r is not None for r in self.engine.slots)

    @property
    def queued(self) -> int:
        """Requests accepted and waiting for a slot."""
        return max(0, self._active - self.running)

    @property
    def active(self) -> int:
        return self._active

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._post(("close",))
        self._thread.join(timeout)

    def _post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self.engine.has_work():
                self._wake.wait()
            self._wake.clear()
            try:
                if not self._drain():
                    return
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave every later request hanging
                log.exception("scheduler inbox failed")
                self._fail({t for t, _ in self._owner.values()}, exc)
            if self.engine.has_work():
                self._step()

    def _drain(self) -> bool:
        """Apply what handlers asked since the last step; False once closed."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True
            kind = message[0]
            if kind == "submit":
                self._admit(*message[1:])
            elif kind == "cancel":
                self._cancel(message[1], "cancelled", message[2] if len(message) > 2 else None)
            elif kind == "close":
                for ticket in {t for t, _ in self._owner.values()}:
                    self._cancel(ticket, "cancelled")
                return False

    def _admit(self, ticket: Ticket, prompt, params, stop, constraint_factory) -> None:
        if ticket._cancelled:
            for i in range(ticket.n):
                self._deliver(ticket, TicketEvent(i, -1, "", finish_reason="cancelled"))
            return
        try:
            ticket.requests = self.engine.submit(prompt, params, stop=stop, constraint_factory=constraint_factory)
        except Exception as exc:  # noqa: BLE001 - e.g. a schema the constraint refuses: that ticket ends, not the worker
            self._fail([ticket], exc)
            return
        for i, req in enumerate(ticket.requests):
            self._owner[req.id] = (ticket, i)

    def _cancel(self, ticket: Ticket, reason: str, index: int | None = None) -> None:
        for i, req in enumerate(ticket.requests):
            # Owned = its reader has not had its last event yet; it may be done already (aborted mid-prefill).
            if req.id in self._owner and index in (None, i):
                self.engine.cancel(req)
                self._end(req, TicketEvent(i, -1, "", finish_reason=reason))

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one failing step ends its requests with an error, not the server
            log.exception("engine step failed")
            self._fail({t for t, _ in self._owner.values()}, exc)
            return
        for ev in events:
            owner = self._owner.get(ev.request.id)
            if owner is None:
                continue
            ticket, index = owner
            if ticket.first_token_s is None:
                ticket.first_token_s = time.perf_counter() - ticket.submitted
            req = ev.request
            logprob = ev.choice if req.params.logprobs is not None else None
            event = TicketEvent(index, ev.choice.token, ev.text, logprob, req.finish_reason)
            if req.done:
                self._end(req, event)
            else:
                self._deliver(ticket, event)
        if self.on_step is not None:
            self.on_step(len(events), time.perf_counter() - started)

    def _fail(self, tickets, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        for ticket in tickets:
            ticket.error = message
            if not ticket.requests:  # never reached the engine
                for i in range(ticket.n):
                    self._deliver(ticket, TicketEvent(i, -1, "", finish_reason="error", error=message))
                continue
            for req in ticket.requests:
                if not req.done:
                    self.engine.cancel(req)
                    req.finish_reason = "error"
                    self._end(req, TicketEvent(self._owner[req.id][1], -1, "", finish_reason="error", error=message))

    def _end(self, req: Request, event: TicketEvent) -> None:
        ticket, _ = self._owner.pop(req.id)
        self._deliver(ticket, event)

    def _deliver(self, ticket: Ticket, event: TicketEvent) -> None:
        if event.finish_reason is not None:
            with self._lock:
                self._active -= 1
        if ticket._loop is None:
            ticket._queue.put(event)
            return
        try:
            ticket._loop.call_soon_threadsafe(ticket._queue.put_nowait, event)
        except RuntimeError:  # the asking loop is gone (server shutting down): nobody is listening
            pass
