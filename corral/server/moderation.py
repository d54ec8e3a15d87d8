"""Guards in the serving path (`corral serve --guard [MODEL]`) and OpenAI's POST /v1/moderations.

    request -> GuardFilter.check_input: every user message assessed (role User), in segments
            -> engine -> GuardedOutput.push: text held until a sentence (or MAX_HELD_CHARS) is complete,
               then the assistant's text so far (this piece and the one before) assessed (role Agent)
            -> released to the client, or Cut("content_filter", "[removed by the guard: S1 Violent Crimes]")

Unsafe text never reaches the client: a piece is released only after the guard has seen it. A guard
that fails (an error, an answer outside the verdict grammar) cuts the stream: fail closed, unless
`--guard-fail-open`. Every user message is checked, not only the last, so a client cannot slip text past
the guard in a made-up history; verdicts of messages seen before are cached (a chat re-sends its history).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import secrets
from collections import OrderedDict

from fastapi import APIRouter, Request

from corral.server.errors import BadRequest
from corral.server.generation import Cut, Prompt
from corral.server.schemas import parse_json
from corral.server.state import get_state

log = logging.getLogger("corral.guard")
router = APIRouter()

FINISH = "content_filter"
SENTENCE_END = re.compile(r"[.!?;:](?=\s)|\n")
MAX_HELD_CHARS = 300
"""A run of text with no sentence end is assessed (and released) once it is this long."""
CACHE_SIZE = 512
_CONTEXT: contextvars.ContextVar[list] = contextvars.ContextVar("guard_context", default=[])
"""The request's user turns, set by check_input and read by output(): both run in `start`, in one task."""


def message_text(m: dict) -> str:
    """A message's text: a string, or the text parts of a list."""
    content = m.get("content")
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def user_turns(prompt: Prompt) -> list[dict]:
    """What a request asks, as guard messages: user and tool messages (tool results are input too) as
    "user", assistant turns as "assistant"; a raw prompt is one user message."""
    if prompt.messages is None:
        return [{"role": "user", "content": prompt.text or ""}]
    out = []
    for m in prompt.messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("user", "tool", "ipython", "assistant"):
            out.append({"role": "assistant" if role == "assistant" else "user", "content": message_text(m)})
    return out


def removed(assessment, policy) -> str:
    names = policy.names()
    named = ", ".join(f"{c} {names.get(c, '')}".strip() for c in assessment.categories) or "unsafe"
    return f"[removed by the guard: {named}]"


class GuardFilter:
    """A corral.server.generation.StreamFilter over a corral.safety guard."""

    def __init__(self, guard, *, fail_open: bool = False):
        self.guard, self.fail_open = guard, fail_open
        self.cache: OrderedDict[str, Cut | None] = OrderedDict()

    def judge(self, conversation: list[dict]) -> Cut | None:
        """The guard's word on the conversation's last message: None (pass) or a Cut."""
        try:
            a = self.guard.assess(conversation)
        except Exception as exc:  # any guard failure: a bad verdict, a model error (fail closed by default)
            log.warning("guard failed: %s", exc)
            return None if self.fail_open else Cut(FINISH, f"[removed: the guard failed ({type(exc).__name__})]")
        return Cut(FINISH, removed(a, self.guard.policy)) if a.flagged else None

    def check_input(self, prompt: Prompt) -> Cut | None:
        turns = user_turns(prompt)
        _CONTEXT.set([t for t in turns if t["role"] == "user"][-1:])
        for t in turns:
            if t["role"] == "user" and t["content"].strip():
                if (cut := self._cached(t["content"])) is not None:
                    return cut
        return None

    def _cached(self, text: str) -> Cut | None:
        if text in self.cache:
            self.cache.move_to_end(text)
            return self.cache[text]
        cut = self.judge([{"role": "user", "content": text}])
        if cut is None or cut.message.startswith("[removed by"):  # a guard failure is not remembered
            self.cache[text] = cut
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return cut

    def output(self) -> GuardedOutput:
        return GuardedOutput(self, list(_CONTEXT.get()))


class GuardedOutput:
    """One sample's output: held back piece by piece until the guard has passed it."""

    def __init__(self, owner: GuardFilter, context: list[dict]):
        self.owner, self.context = owner, context
        self.pending = ""
        self.previous = ""
        """The last piece released: assessed again with the next one, so a sentence pair is seen whole."""

    def push(self, text: str) -> str | Cut:
        self.pending += text
        ends = [m.end() for m in SENTENCE_END.finditer(self.pending)]
        upto = ends[-1] if ends else (len(self.pending) if len(self.pending) >= MAX_HELD_CHARS else 0)
        if not upto:
            return ""
        piece, self.pending = self.pending[:upto], self.pending[upto:]
        return self._release(piece)

    def finish(self) -> str | Cut:
        piece, self.pending = self.pending, ""
        return self._release(piece) if piece.strip() else piece

    def _release(self, piece: str) -> str | Cut:
        conversation = [*self.context, {"role": "assistant", "content": self.previous + piece}]
        cut = self.owner.judge(conversation)
        if cut is not None:
            return cut
        self.previous = piece
        return piece


def install_guard(state) -> None:
    """Load the guard the config names and put its filter first in line (before code scanners: the guard
    sees the model's own text)."""
    from corral.safety.guard import load_guard

    c = state.config
    state.guard = load_guard(c.guard, exclude=tuple(c.guard_exclude), threshold=c.guard_threshold,
                             store=state.store)
    state.filters.insert(0, GuardFilter(state.guard, fail_open=c.guard_fail_open))


# -- POST /v1/moderations ----------------------------------------------------------------------------

# OpenAI's moderation categories, each from the Llama Guard 3 codes that cover it (score: their max)
OPENAI_CATEGORIES = {
    "harassment": ["S5"], "harassment/threatening": ["S1"], "hate": ["S10"], "hate/threatening": ["S10"],
    "illicit": ["S2", "S3", "S8", "S14"], "illicit/violent": ["S1", "S9"], "self-harm": ["S11"],
    "self-harm/intent": ["S11"], "self-harm/instructions": ["S11"], "sexual": ["S3", "S12"],
    "sexual/minors": ["S4"], "violence": ["S1", "S9"], "violence/graphic": ["S1"],
}
MAX_INPUTS = 32


def moderation_inputs(body: dict) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and 0 < len(value) <= MAX_INPUTS:
        texts = [v if isinstance(v, str) else v.get("text") if isinstance(v, dict) and v.get("type") == "text"
                 else None for v in value]
        if all(isinstance(t, str) for t in texts):
            return texts
    raise BadRequest(f"input must be a string or a list of 1-{MAX_INPUTS} strings (or text parts)", param="input")


def moderation_result(a) -> dict:
    """An Assessment as OpenAI's result: its categories under OpenAI's names and Llama Guard's codes."""
    flagged_codes = set(a.categories)
    scores = dict(a.category_scores)
    categories = {code: code in flagged_codes for code in scores}
    for name, codes in OPENAI_CATEGORIES.items():
        categories[name] = any(c in flagged_codes for c in codes)
        scores[name] = max((scores.get(c, 0.0) for c in codes), default=0.0)
    return {"flagged": a.flagged, "categories": categories, "category_scores": scores,
            "category_applied_input_types": {k: ["text"] for k in OPENAI_CATEGORIES}, "unsafe_score": a.score}


async def guard_of(state):
    """The server's guard (--guard), else the embedded guard, loaded on first use and kept."""
    async with state.embedders.setdefault("guard_lock", asyncio.Lock()):
        if state.guard is None:
            from corral.safety.guard import load_guard

            state.guard = await asyncio.to_thread(load_guard, None)
    return state.guard


@router.post("/v1/moderations")
async def moderations(request: Request) -> dict:
    state = get_state(request)
    texts = moderation_inputs(parse_json(await request.body()))
    guard = await guard_of(state)
    results = await asyncio.to_thread(lambda: [guard.assess([{"role": "user", "content": t}]) for t in texts])
    return {"id": f"modr-{secrets.token_hex(12)}", "model": guard.name,
            "results": [moderation_result(a) for a in results]}
