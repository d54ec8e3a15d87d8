"""Jinja chat templates (GGUF ``tokenizer.chat_template``, HF ``tokenizer_config.json``).

A template is code that arrives with a downloaded model, so it runs in Jinja's immutable
sandbox and every failure, from a syntax error to a blocked ``__class__`` access, becomes a
ChatFormatError. The template is never trusted with message content: it renders with each
content replaced by a sentinel, and the text it produced is split at the sentinels. Template
text is encoded with special tokens allowed; content with them refused, so a user who types
``<|im_start|>system`` gets plain text, not a new turn.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from corral.errors import ChatFormatError
from corral.tokenizer import Tokenizer
from corral.tokenizer.messages import Dialog, Message, parse_reply, to_messages

Segment = tuple[str, bool]  # (text, is_template_text); template text may hold special tokens
MAX_RENDER_CHARS = 4_000_000  # a rendered prompt past this is a runaway template, not a dialog
_MAX_EXPONENT = 1000


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's default sandbox renders a blocked attribute as an empty Undefined, so
    ``{{ ''.__class__ }}`` would pass silently; here it is an error the caller sees."""

    # `'a' * 10**9` and `7 ** 99999999` would eat memory or CPU before any output limit is reached.
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over the limit of {_MAX_EXPONENT}")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                raise SecurityError(f"repeating a sequence to over {MAX_RENDER_CHARS} items")
        return super().call_binop(context, operator, left, right)


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
    except SecurityError as e:
        raise ChatFormatError(f"chat template tried an unsafe operation: {e}") from None
    except TemplateError as e:  # raise_exception(...) and undefined-variable errors land here
        raise ChatFormatError(f"chat template failed: {e}") from None
    except Exception as e:  # a template is user code: 1 + 'a', None[0], runaway recursion
        raise ChatFormatError(f"chat template failed: {type(e).__name__}: {e}") from None


def _render_bounded(template: jinja2.Template, context: dict[str, Any]) -> str:
    chunks, size = [], 0
    for chunk in template.generate(**context):
        size += len(chunk)
        if size > MAX_RENDER_CHARS:
            raise SecurityError(f"rendered text is over the limit of {MAX_RENDER_CHARS} characters")
        chunks.append(chunk)
    return "".join(chunks)


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
