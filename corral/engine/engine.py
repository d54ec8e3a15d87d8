"""The inference engine: token ids in, token ids out, many sequences at once.

One `step()` is: admit waiting requests into free cache slots (`prefill`, reusing any prefix a
slot still holds), then one batched `decode` of every running sequence, each at its own
position. Requests join and leave between steps, which is what the server's continuous
batching builds on. A lone greedy request may instead take a `speculate` step (draft tokens
checked in one forward). The reference path in generate.py stays the oracle for all of this.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from corral.engine.generate import TextStream
from corral.engine.kv_cache import SlotCache, cache_dtype
from corral.engine.sampling import Choice, SamplingParams, choose
from corral.engine.speculative import Drafter, accept_greedy
from corral.errors import CorralError
from corral.model.llama import Transformer


class RequestError(CorralError, ValueError):
    """A request the engine cannot run (ids outside the vocabulary, bad sampling parameters)."""


class ContextLengthError(RequestError):
    """The prompt is empty or does not fit in the context."""


class Aborted(Exception):
    """A forward stopped between layers because its request was aborted."""


class AbortableCache:
    """A cache view that stops the forward at the next layer once `req.abort` is set. A long prompt's prefill
    is one forward (seconds for thousands of tokens); this lets a client that left end it within a layer."""

    def __init__(self, view, req: Request):
        self.view, self.req = view, req

    def _check(self) -> None:
        if self.req.abort:
            raise Aborted

    def update(self, layer_id: int, start_pos, k, v):
        self._check()
        return self.view.update(layer_id, start_pos, k, v)

    def rows_of(self, layer_id: int):  # the C block step's way in (corral.kernels.attention)
        self._check()
        return self.view.rows_of(layer_id)

    def __getattr__(self, name: str):
        return getattr(self.view, name)


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    stop: Sequence[str] = ()
    id: int = 0
    output: list[int] = field(default_factory=list)
    logprobs: list[Choice] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running; "stop", "length" or "cancelled" once done."""
    slot: int = -1
    pos: int = 0
    """Tokens of this sequence whose keys and values are in its slot."""
    text: TextStream | None = None
    generator: torch.Generator | None = None
    timings: dict[str, float] = field(default_factory=dict)
    constraint: Any = None
    """A corral.engine.constrain Constraint (mask / advance / complete) limiting what may come next, or None."""
    abort: bool = False
    """Set from any thread (a client that left): a running prefill stops at its next layer, then it is cancelled."""
    _seen: torch.Tensor | None = None
    _counts: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    text: str | None = None
    logprobs: list[Choice] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """prefill_s (the prompt's forward), decode_s (first token to last), reused_prefix (cached tokens)."""


@dataclass
class Event:
    """What one step produced for one request: a token, the text it completed, and whether it ended."""

    request: Request
    choice: Choice
    text: str = ""


class Engine:
    """Runs a model over many requests: `submit` then `step`, or the one-call `generate` / `stream`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        stop_ids: Iterable[int] = (),
        drafter: Drafter | None = None,
        speculate_k: int = 4,
        compile: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        self.stop_ids = frozenset(stop_ids)
        weight = model.norm.weight
        self.device = weight.device
        self.cache = SlotCache(self.config, max_batch_size, self.max_seq_len, dtype=cache_dtype(model),
                               device=self.device)
        self.slots: list[Request | None] = [None] * max_batch_size
        self.kept: list[list[int]] = [[] for _ in range(max_batch_size)]
        """Token ids whose keys and values each slot still holds (the prefix cache)."""
        self.waiting: deque[Request] = deque()
        self.drafter, self.speculate_k = drafter, speculate_k
        self._ids = itertools.count()
        self.forward_decode = compile_decode(model) if compile else model
        """The decode step's forward: torch.compile'd when asked (and when that works), else the eager model."""

    # -- requests -----------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, *, stop: Sequence[str] = (),
               stop_ids: Iterable[int] | None = None, constraint_factory: Callable[[], Any] | None = None,
               ) -> list[Request]:
        """Queue a prompt; returns its params.n requests (n samples share one prefill).

        constraint_factory, when given, makes one Constraint per request (constrained decoding, e.g. JSON).
        """
        prompt = self.check_prompt(prompt, params)
        stops = frozenset(stop_ids) if stop_ids is not None else self.stop_ids
        requests = []
        for i in range(params.n):
            req = Request(list(prompt), params, stops, tuple(s for s in stop if s), id=next(self._ids))
            if constraint_factory is not None:
                req.constraint = constraint_factory()
            if self.tokenizer is not None:
                req.text = TextStream(req.stop)
            if params.seed is not None:  # sample i of a seeded request gets seed + i: reproducible, yet distinct
                req.generator = torch.Generator(device=self.device).manual_seed(params.seed + i)
            requests.append(req)
        self.waiting.extend(requests)
        return requests

    def check_prompt(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        vocab = self.config.vocab_size
        prompt = list(prompt)
        if not prompt:
            raise ContextLengthError("the prompt is empty")
        bad = [i for i in prompt if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise RequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:3]}")
        if len(prompt) >= self.max_seq_len:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq_len}")
        problems = params.problems(vocab)
        if problems:
            raise RequestError("; ".join(problems))
        return prompt

    def cancel(self, request: Request) -> None:
        """Stop a request; its slot is free for the next step (its prefix stays reusable)."""
        if request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, "cancelled")

    def clear_prefix_cache(self) -> None:
        """Forget what idle slots hold, so the next prompt is prefilled in full (benchmarks, memory)."""
        for i, r in enumerate(self.slots):
            if r is None:
                self.kept[i] = []

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    # -- one step -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit what fits, then advance every running request by at least one token."""
        events = self._admit()
        running = [r for r in self.slots if r is not None and r.pos > 0 and not r.done and r.output]
        fresh = {e.request.id for e in events}
        running = [r for r in running if r.id not in fresh]  # just prefilled: their first token is out already
        if len(running) == 1 and self._can_speculate(running[0]):
            events += self.speculate(running[0])
        elif running:
            events += self.decode(running)
        return events

    def _admit(self) -> list[Event]:
        events: list[Event] = []
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            siblings = [r for r in self.waiting if r.prompt is req.prompt or r.prompt == req.prompt][: req.params.n - 1]
            slot = self._pick_slot(req.prompt)
            logits = self.prefill(req, slot)
            if logits is None:  # aborted mid-prefill: its siblings share the prompt and the fate
                for sib in siblings:
                    self.cancel(sib)
                continue
            events.append(self._emit(req, logits))
            for sib in siblings:
                if None not in self.slots:
                    break
                self.waiting.remove(sib)
                twin = self._pick_slot(sib.prompt, avoid_reuse=True)
                self.cache.reserve(twin + 1, len(req.prompt) + 1)
                self.cache.copy_slot(slot, twin, len(req.prompt))
                self._occupy(sib, twin, len(req.prompt))
                sib.timings.update(prefill_s=0.0, reused_prefix=len(req.prompt), start=time.perf_counter())
                events.append(self._emit(sib, logits))
        return events

    def _pick_slot(self, prompt: list[int], avoid_reuse: bool = False) -> int:
        """The free slot holding the longest prefix of the prompt (lowest index on ties, to keep batches dense)."""
        free = [i for i, r in enumerate(self.slots) if r is None]
        if avoid_reuse:
            return free[0]
        return max(free, key=lambda i: (shared_prefix(self.kept[i], prompt), -i))

    def _occupy(self, req: Request, slot: int, pos: int) -> None:
        self.slots[slot], req.slot, req.pos = req, slot, pos
        self.kept[slot] = list(req.prompt[:pos])

    def prefill(self, req: Request, slot: int) -> torch.Tensor | None:
        """Run the part of the prompt the slot does not hold yet; float32 logits (vocab,) of its last token,
        or None when the request was aborted meanwhile (it is cancelled; the slot is free again)."""
        started = time.perf_counter()
        # Always recompute at least the last prompt token: its logits pick the first new token.
        reuse = min(shared_prefix(self.kept[slot], req.prompt), len(req.prompt) - 1)
        self.cache.reserve(slot + 1, len(req.prompt) + 1)
        self._occupy(req, slot, reuse)
        tokens = torch.tensor([req.prompt[reuse:]], device=self.device)  # (1, T)
        cache = AbortableCache(self.cache.view(slice(slot, slot + 1), len(req.prompt)), req)
        try:
            logits = self.model(tokens, start_pos=reuse, cache=cache, last_only=True)[0, -1]
        except Aborted:
            self.kept[slot] = list(req.prompt[:reuse])  # the rows past the reused prefix are half written
            self._finish(req, "cancelled")
            return None
        self.kept[slot] = list(req.prompt)
        req.pos = len(req.prompt)
        now = time.perf_counter()
        req.timings.update(prefill_s=now - started, reused_prefix=reuse, start=now)
        return logits

    def decode(self, running: list[Request]) -> list[Event]:
        """One token for every running request, in one forward over the slots 0..max used."""
        if len(running) == 1 and self.forward_decode is self.model:
            return self._decode_one(running[0])
        rows = max(r.slot for r in running) + 1
        self.cache.reserve(rows, max(r.pos for r in running) + 2)
        scratch = self.cache.scratch
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.full((rows,), scratch, dtype=torch.long)  # idle rows write to the scratch position
        for r in running:
            tokens[r.slot, 0], positions[r.slot] = r.output[-1], r.pos
        kv_len = int(max(r.pos for r in running)) + 1
        # Row b sees keys 0..positions[b]; an idle row sees everything up to kv_len (ignored anyway).
        mask = (torch.arange(kv_len)[None, :] <= positions[:, None])[:, None, None, :]  # (rows, 1, 1, kv_len)
        cache = self.cache.view(slice(0, rows), kv_len)
        logits = self._forward_decode(tokens.to(self.device), positions.to(self.device), cache, mask.to(self.device))
        for r in running:
            self.kept[r.slot].append(r.output[-1])
            r.pos += 1
        return self._emit_many(running, logits[[r.slot for r in running]])

    def _decode_one(self, req: Request) -> list[Event]:
        """Batch-1 decode: the slot alone at an int position, so no mask and plain slice writes to the cache."""
        self.cache.reserve(req.slot + 1, req.pos + 2)
        tokens = torch.tensor([[req.output[-1]]], device=self.device)
        cache = self.cache.view(slice(req.slot, req.slot + 1), req.pos + 1)
        logits = self.model(tokens, start_pos=req.pos, cache=cache)[:, -1]  # (1, vocab)
        self.kept[req.slot].append(req.output[-1])
        req.pos += 1
        return self._emit_many([req], logits)

    def _forward_decode(self, tokens, positions, cache, mask) -> torch.Tensor:
        try:
            return self.forward_decode(tokens, start_pos=positions, cache=cache, mask=mask)[:, -1]  # (rows, vocab)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the eager model
            if self.forward_decode is self.model:
                raise
            warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {exc}); running eager",
                          stacklevel=2)
            self.forward_decode = self.model
            return self.model(tokens, start_pos=positions, cache=cache, mask=mask)[:, -1]

    def speculate(self, req: Request) -> list[Event]:
        """Greedy speculative step: propose k tokens, check them in one forward, keep the agreeing prefix."""
        context = req.prompt + req.output
        room = min(self.speculate_k, self.max_seq_len - req.pos - 2, req.params.max_new_tokens - len(req.output))
        draft = self.drafter.propose(context, max(room, 0))
        if not draft:
            return self.decode([req])
        fed = [req.output[-1], *draft]  # (k+1) tokens at positions pos..pos+k
        self.cache.reserve(req.slot + 1, req.pos + len(fed) + 1)
        cache = self.cache.view(slice(req.slot, req.slot + 1), req.pos + len(fed))
        logits = self.model(torch.tensor([fed], device=self.device), start_pos=req.pos, cache=cache)[0]  # (k+1, V)
        accepted = accept_greedy(draft, logits.argmax(-1).tolist())  # agreeing drafts + the model's own next token
        events = []
        for i, token in enumerate(accepted):
            self.kept[req.slot].append(fed[i])
            req.pos += 1
            events.append(self._emit(req, None, Choice(token)))
            if req.done:
                break
        self.drafter.observe(context, len(accepted) - 1, len(draft))
        return events

    def _can_speculate(self, req: Request) -> bool:
        p = req.params
        return (self.drafter is not None and req.constraint is None and p.greedy and not p.penalized
                and not p.logit_bias and p.logprobs is None)

    # -- tokens out ---------------------------------------------------------------------------------

    def _emit_many(self, reqs: list[Request], logits: torch.Tensor) -> list[Event]:
        if any(r.constraint is not None for r in reqs):
            logits = torch.stack([_constrained(r, row) for r, row in zip(reqs, logits)])
        history = [self._history(r) for r in reqs]
        choices = choose(logits, [r.params for r in reqs], [r.generator for r in reqs], history)
        return [self._emit(r, None, c) for r, c in zip(reqs, choices)]

    def _emit(self, req: Request, logits: torch.Tensor | None, choice: Choice | None = None) -> Event:
        """Record one chosen token for req (choosing it from logits (vocab,) if needed) and check the ends."""
        if choice is None:
            logits = _constrained(req, logits)
            choice = choose(logits[None], [req.params], [req.generator], [self._history(req)])[0]
        token, p = choice.token, req.params
        if token in req.stop_ids and not p.ignore_eos:
            self._finish(req, "stop")
            return Event(req, choice, self._flush(req))
        req.output.append(token)
        if p.logprobs is not None:
            req.logprobs.append(choice)
        if req._counts is not None:
            req._counts[token] += 1
            req._seen = None  # rebuilt lazily with the new token
        text = ""
        if req.text is not None:
            text = req.text.push(self.tokenizer.decode_bytes([token]))
            if req.text.stopped:
                self._finish(req, "stop")
                return Event(req, choice, text)
        if req.constraint is not None:
            req.constraint.advance(token)
            if req.constraint.complete() and not _can_continue(req.constraint):  # a whole value, nothing may follow
                self._finish(req, "stop")
                return Event(req, choice, text + self._flush(req))
        if len(req.output) >= p.max_new_tokens or req.pos + 1 >= self.max_seq_len:
            self._finish(req, "length")
            text += self._flush(req)
        return Event(req, choice, text)

    def _history(self, req: Request):
        """(seen ids, generated counts) for the penalties, kept per request; None when none is asked for."""
        if not req.params.penalized:
            return None
        if req._counts is None:
            req._counts = torch.zeros(self.config.vocab_size, device=self.device)
            for t in req.output:
                req._counts[t] += 1
        if req._seen is None:
            req._seen = torch.tensor(sorted(set(req.prompt) | set(req.output)), device=self.device, dtype=torch.long)
        return req._seen, req._counts

    def _flush(self, req: Request) -> str:
        return req.text.finish() if req.text is not None and not req.text.stopped else ""

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.finish_reason = reason
        if "start" in req.timings:
            req.timings["decode_s"] = time.perf_counter() - req.timings.pop("start")
        if 0 <= req.slot < len(self.slots) and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            # The slot keeps what its cache rows really hold: the prompt and every token fed back so far.
            self.kept[req.slot] = self.kept[req.slot][: req.pos]

    # -- one-call helpers ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 *, stop: Sequence[str] = ()) -> list[Completion]:
        """Run prompts together (continuous batching); params.n completions per prompt, in order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        requests = [r for prompt, p in zip(prompts, plist) for r in self.submit(prompt, p, stop=stop)]
        while any(not r.done for r in requests):
            self.step()
        return [completion(r) for r in requests]

    def stream(self, prompt: Sequence[int], params: SamplingParams, *, stop: Sequence[str] = ()) -> Iterator[Event]:
        """Events of one request as they come; closing the iterator cancels it."""
        (req,) = self.submit(prompt, params if params.n == 1 else _single(params), stop=stop)
        try:
            while not req.done:
                for event in self.step():
                    if event.request is req:
                        yield event
        finally:
            if not req.done:
                self.cancel(req)


def _constrained(req: Request, logits: torch.Tensor) -> torch.Tensor:
    """logits (vocab,) with what req's constraint forbids set to -inf (stop ids are let through only at a dead end)."""
    if req.constraint is None:
        return logits
    allowed = req.constraint.mask()
    if allowed is None:
        return logits
    allowed = allowed.to(logits.device)
    # A whole value may end here (a number could also go on), and a dead end ends rather than emit garbage.
    if req.constraint.complete() or not bool(allowed.any()):
        allowed = allowed.clone()
        allowed[[t for t in req.stop_ids if t < allowed.numel()]] = True
    return logits.masked_fill(~allowed, float("-inf"))


def _can_continue(constraint) -> bool:
    allowed = constraint.mask()
    return allowed is not None and bool(allowed.any())


def completion(req: Request) -> Completion:
    text = req.text.text if req.text is not None else None
    return Completion(list(req.output), req.finish_reason or "cancelled", len(req.prompt), text,
                      req.logprobs if req.params.logprobs is not None else None, dict(req.timings))


def compile_decode(model: Transformer):
    """torch.compile for the one-token step: dynamic shapes so batch rows and cache length do not recompile."""
    return torch.compile(model, dynamic=True)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b have in common (the part of a cached prompt a new one can reuse)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _single(params: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(params, n=1)
