"""Jinja chat templates (GGUF ``tokenizer.chat_template``, HF ``tokenizer_config.json``).

A template is code that arrives with a downloaded model (or a client: Ollama's ``template``
field, a Modelfile's TEMPLATE), so it runs in Jinja's immutable sandbox and every failure, from a
syntax error to a blocked ``__class__`` access, becomes a ChatFormatError. A render also has a
budget (RELIABILITY 39): RENDER_SECONDS of time, checked on every line the template runs, and
MAX_RENDER_CHARS for its output and for every string or list it builds on the way (``~``, ``+``,
``*``, ``%``, filters and method calls), so nested ``range`` loops and ``ns.s ~ ns.s`` doubling
stop early instead of freezing the caller or eating gigabytes. ``check_template`` runs a trial
render at create time. The template is never trusted with message content: it renders with each
content replaced by a sentinel, and the text it produced is split at the sentinels. Template
text is encoded with special tokens allowed; content with them refused, so a user who types
``<|im_start|>system`` gets plain text, not a new turn.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from corral.errors import ChatFormatError
from corral.tokenizer import Tokenizer
from corral.tokenizer.messages import Dialog, Message, parse_reply, to_messages

Segment = tuple[str, bool]  # (text, is_template_text); template text may hold special tokens
MAX_RENDER_CHARS = 4_000_000  # a rendered prompt past this is a runaway template, not a dialog
RENDER_SECONDS = 3.0  # a real dialog renders in milliseconds; loops that need more are a runaway template
_MAX_EXPONENT = 1000


class RenderBudgetError(SecurityError):
    """A render ran past RENDER_SECONDS or built something over MAX_RENDER_CHARS."""


def _sized(value: Any) -> Any:
    """`value`, unless it is a string or sequence over the budget (checked after each operation that builds one)."""
    if isinstance(value, str | list | tuple | dict) and len(value) > MAX_RENDER_CHARS:
        raise RenderBudgetError(f"the template built a value of over {MAX_RENDER_CHARS} characters or items")
    return value


def _no_huge_counts(args: Iterable[Any]) -> None:
    """`'a'.ljust(10**9)`, `x|center(10**9)`: refuse the count before the allocation."""
    if any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_RENDER_CHARS for a in args):
        raise RenderBudgetError(f"an argument over {MAX_RENDER_CHARS} (the render's size budget)")


def _checked_filter(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)  # keeps jinja_pass_arg, so context/environment filters still get theirs
    def run(*args: Any, **kwargs: Any) -> Any:
        _no_huge_counts([*args, *kwargs.values()])
        return _sized(fn(*args, **kwargs))

    return run


class _BudgetCodeGenerator(CodeGenerator):
    """`a ~ b` compiles to a join Python runs directly; route it through the environment to check its size."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's default sandbox renders a blocked attribute as an empty Undefined, so
    ``{{ ''.__class__ }}`` would pass silently; here it is an error the caller sees."""

    # `'a' * 10**9` and `7 ** 99999999` would eat memory or CPU before any output limit is reached;
    # `+` and `%` can double a string per step, as `~` can (see checked_join).
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetCodeGenerator

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over the limit of {_MAX_EXPONENT}")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                raise SecurityError(f"repeating a sequence to over {MAX_RENDER_CHARS} items")
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        _no_huge_counts([*args, *kwargs.values()])
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def checked_join(self, parts: Iterable[Any]) -> str:
        pieces = [str(p) for p in parts]
        if sum(map(len, pieces)) > MAX_RENDER_CHARS:
            raise RenderBudgetError(f"joining strings to over {MAX_RENDER_CHARS} characters")
        return "".join(pieces)


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox, with HF's settings and helpers."""
    if not isinstance(source, str):
        raise ChatFormatError(f"chat template must be a string, got {type(source).__name__}")
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters = {name: _checked_filter(fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise ChatFormatError(f"chat template syntax error at line {e.lineno}: {e.message}") from None
    except (TemplateError, RecursionError, MemoryError) as e:
        raise ChatFormatError(f"chat template cannot be compiled: {e}") from None


def render_template(template: jinja2.Template, **context: Any) -> str:
    """Run a compiled template; anything it raises is the template's fault, so it is a ChatFormatError."""
    try:
        return _render_bounded(template, context)
    except RenderBudgetError as e:
        raise ChatFormatError(f"chat template is over its budget: {e}") from e
    except SecurityError as e:
        raise ChatFormatError(f"chat template tried an unsafe operation: {e}") from e
    except TemplateError as e:  # raise_exception(...) and undefined-variable errors land here
        raise ChatFormatError(f"chat template failed: {e}") from None
    except Exception as e:  # a template is user code: 1 + 'a', None[0], runaway recursion
        raise ChatFormatError(f"chat template failed: {type(e).__name__}: {e}") from None


def _render_bounded(template: jinja2.Template, context: dict[str, Any]) -> str:
    """Render with the output and time budgets. Time is checked on each line of the compiled template
    (its code objects are named "<template>"): a trace function in this thread only, restored after."""
    deadline = time.monotonic() + RENDER_SECONDS

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise RenderBudgetError(f"rendering took over {RENDER_SECONDS:g} s")
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    chunks, size = [], 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise SecurityError(f"rendered text is over the limit of {MAX_RENDER_CHARS} characters")
            chunks.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(chunks)


TRIAL_DIALOGS = ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
                 [{"role": "user", "content": "Hi"}])


def check_template(source: str) -> jinja2.Template:
    """Compile, then render a short dialog within the budget: a template that loops or grows without end is
    refused when it is stored, not at its first chat (RELIABILITY 39). A template that refuses a dialog shape
    (raise_exception: "system role not supported") is fine if it renders another."""
    template = compile_template(source)
    failure: ChatFormatError | None = None
    for messages in TRIAL_DIALOGS:
        try:
            render_template(template, messages=messages, add_generation_prompt=True, bos_token="<s>",
                            eos_token="</s>", tools=None)
            return template
        except ChatFormatError as exc:
            if isinstance(exc.__cause__, SecurityError):
                raise
            failure = failure or exc
    raise ChatFormatError(f"chat template fails a trial render: {failure}")


class JinjaChatFormat:
    """A model's own Jinja chat template, rendered safely and tokenized without forged turns.

    ``stop_ids`` defaults to the id of ``eos_token`` when not given.
    """

    def __init__(self, template: str, tokenizer: Tokenizer, *, bos_token: str = "", eos_token: str = "",
                 stop_ids: Iterable[int] = ()):
        self.template = compile_template(template)
        self.tokenizer, self.bos_token, self.eos_token = tokenizer, bos_token, eos_token
        stops = frozenset(stop_ids)
        if not stops and eos_token:
            stops = frozenset({tokenizer.token_id(eos_token)})
        self.stop_ids = stops
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode_dialog(self, messages: Dialog, *, add_generation_prompt: bool = True,
                      tools: list[dict] | None = None) -> list[int]:
        ids: list[int] = []
        for text, from_template in self._segments(messages, add_generation_prompt, tools):
            if text:
                ids.extend(self.tokenizer.encode(text, allow_special=from_template))
        return ids

    def render(self, messages: Dialog, *, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        return "".join(text for text, _ in self._segments(messages, add_generation_prompt, tools))

    def parse_reply(self, text: str) -> Message:
        text = text.rstrip()
        if self.eos_token and text.endswith(self.eos_token):  # the engine may keep the stop token's text
            text = text[: -len(self.eos_token)]
        return parse_reply(text)

    def _segments(self, messages: Dialog, add_generation_prompt: bool, tools: list[dict] | None) -> list[Segment]:
        msgs = to_messages(messages)
        self._refuse_special_text(msgs, tools)
        nonce = secrets.token_hex(8)
        dicts = [_template_message(m, _sentinel(nonce, i)) for i, m in enumerate(msgs)]
        text = render_template(self.template, messages=dicts, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        return _split_at_sentinels(text, nonce, msgs)

    def _refuse_special_text(self, msgs: list[Message], tools: Any) -> None:
        """Tool calls, names and tool definitions land in template text, which may hold special
        tokens; only message content is tracked by sentinels, so special text elsewhere is refused."""
        if tools is not None and not isinstance(tools, list):
            raise ChatFormatError(f"tools must be a list, got {type(tools).__name__}")
        if self._special_text is None:
            return
        for i, m in enumerate(msgs):
            extras = [m.name, m.tool_call_id] + [(c.name, c.arguments, c.id) for c in m.tool_calls]
            if any(self._special_text.search(s) for s in _strings(extras)):
                raise ChatFormatError(f"message {i}: special-token text in a tool call, name or id")
        if any(self._special_text.search(s) for s in _strings(tools)):
            raise ChatFormatError("tools: special-token text in a tool definition")


def template_chat_format(template: str, tokenizer: Tokenizer, *,
                         stop_ids: Iterable[int] | None = None) -> JinjaChatFormat:
    """The chat format for a Jinja template (a GGUF's or tokenizer_config.json's, a Modelfile TEMPLATE,
    an Ollama request's), with the tokenizer's own BOS/EOS text as `bos_token`/`eos_token`.

    `stop_ids` None: end of text, plus `<|im_end|>` where the vocabulary has it (ChatML models end a
    turn with it, not with end of text). A loaded model passes its own `stop_ids` instead.
    """
    specials = tokenizer.special_tokens
    id_to_text = {i: t for t, i in specials.items()}
    if stop_ids is None:
        stop_ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        if "<|im_end|>" in specials:
            stop_ids.add(specials["<|im_end|>"])
    return JinjaChatFormat(template, tokenizer, bos_token=id_to_text.get(tokenizer.bos_id, ""),
                           eos_token=id_to_text.get(tokenizer.eos_id, ""), stop_ids=frozenset(stop_ids))


def _sentinel(nonce: str, index: int) -> str:
    # Private-use code points around a random nonce: no real content or template contains it.
    return f"\ue000{nonce}:{index}\ue001"


def _template_message(m: Message, sentinel: str) -> dict[str, Any]:
    """The HF/OpenAI message dict a template expects, with content swapped for its sentinel."""
    lead, core, trail = _edges(m.content)
    if core:  # keep the edge whitespace outside the sentinel so a template's |trim still trims it
        content = lead + sentinel + trail
    else:  # an empty content stays empty, so `{% if message.content %}` sees what it would see
        content = m.content
    d: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls:
        d["tool_calls"] = [{"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                           for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    return d


def _split_at_sentinels(text: str, nonce: str, msgs: list[Message]) -> list[Segment]:
    """Rendered text -> template pieces and content pieces, in order.

    Edge whitespace of a content that the template left in place joins the content piece,
    so the content tokenizes as one run, as it would in the plain rendered string.
    """
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
    segs: list[Segment] = [(pieces[0], True)]
    for k in range(1, len(pieces), 2):
        lead, core, trail = _edges(msgs[int(pieces[k])].content)
        before, after = segs[-1][0], pieces[k + 1]
        if lead and before.endswith(lead):
            segs[-1], core = (before[: len(before) - len(lead)], True), lead + core
        if trail and after.startswith(trail):
            after, core = after[len(trail):], core + trail
        segs += [(core, False), (after, True)]
    if any("\ue000" in s or nonce in s for s, from_template in segs if from_template):
        raise ChatFormatError("chat template altered message content (sliced or escaped it); cannot tokenize safely")
    return segs


def _edges(text: str) -> tuple[str, str, str]:
    """(leading whitespace, stripped text, trailing whitespace)."""
    core = text.strip()
    if not core:
        return text, "", ""
    start = len(text) - len(text.lstrip())
    return text[:start], core, text[start + len(core):]


def _strings(value: Any) -> Iterable[str]:
    """Every string inside nested lists, tuples and dicts (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
