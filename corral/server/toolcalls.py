"""Tool calls over HTTP: forcing a call's shape, telling calls from text while streaming, OpenAI's shapes.

The chat format renders tool definitions and parses the reply (``parse_reply`` knows every Llama
3.x call form plus a bare ``{"name", "arguments"}`` JSON object). What the server adds:

- tool_choice "required" or a named function: the reply is constrained to the JSON object
  ``{"name": <tool>, "arguments": <its parameters schema>}`` (corral.engine.constrain), so even a
  small model produces a parseable call;
- a model whose template ignores ``tools`` (SmolLM2's does) gets the tool list in its system message;
- streaming with tools holds text back while it may still be a call (``CallFilter``).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

# Text that starts a tool call in one of the forms parse_reply reads.
CALL_STARTS = ("<|python_tag|>", "<function=", "{", "[")
INLINE_MARKERS = ("<|python_tag|>", "<function=")  # may follow some prose

FALLBACK_PROMPT = (
    "You can call these functions:\n{functions}\n\n"
    'To call one, reply with only a JSON object: {{"name": <function name>, "arguments": {{...}}}}.'
)


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """JSON schema of one call object to the named tool (or to any of them)."""
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    variants = [{"type": "object",
                 "properties": {"name": {"enum": [fn["name"]]},
                                "arguments": fn.get("parameters") or {"type": "object"}},
                 "required": ["name", "arguments"]} for fn in fns]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def with_tool_prompt(chat_format, messages: list, tools: list[dict]) -> tuple[list, list[dict] | None]:
    """(messages, tools) to render: unchanged when the template shows the tools, else the tool list
    moves into the system message (and tools=None, so the template is not asked twice)."""
    if chat_format.render(messages, tools=tools) != chat_format.render(messages, tools=None):
        return messages, tools
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    note = FALLBACK_PROMPT.format(functions=specs)
    msgs = list(messages)
    first = msgs[0] if msgs else None
    if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
        msgs[0] = {**first, "content": f"{first['content']}\n\n{note}"}
    else:
        msgs.insert(0, {"role": "system", "content": note})
    return msgs, None


def openai_tool_calls(calls: list, *, streaming: bool = False) -> list[dict]:
    """ToolCall records -> OpenAI's list; arguments become a JSON *string*."""
    out = []
    for i, call in enumerate(calls):
        item: dict[str, Any] = {"id": call.id or f"call_{secrets.token_hex(12)}", "type": "function",
                                "function": {"name": call.name,
                                             "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
        if streaming:
            item = {"index": i, **item}
        out.append(item)
    return out


class CallFilter:
    """Streamed text in, text safe to show as content out; text that may be a tool call is held back.

    States: "undecided" until the first non-space text shows whether the reply opens with a call;
    "content" passes text through but keeps back a tail that could begin an inline marker;
    "call" holds everything (the end of the reply decides: calls, or the held text as content).
    """

    def __init__(self, forced: bool = False):
        self.state = "call" if forced else "undecided"
        self.held = ""

    def push(self, text: str) -> str:
        self.held += text
        if self.state == "undecided":
            head = self.held.lstrip()
            if not head:
                return ""
            if head.startswith(CALL_STARTS):
                self.state = "call"
                return ""
            if any(m.startswith(head) for m in INLINE_MARKERS):
                return ""  # "<" or "<func": could still become a marker
            self.state = "content"
        if self.state == "call":
            return ""
        return self._release()

    def _release(self) -> str:
        for marker in INLINE_MARKERS:
            at = self.held.find(marker)
            if at >= 0:
                out, self.held, self.state = self.held[:at], self.held[at:], "call"
                return out
        keep = _partial_marker_tail(self.held)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> str:
        """The held text (call the chat format's parser first: if it found calls, drop this instead)."""
        out, self.held = self.held, ""
        return out


def _partial_marker_tail(text: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of a marker."""
    best = 0
    for marker in INLINE_MARKERS:
        for k in range(1, len(marker)):
            if text.endswith(marker[:k]):
                best = max(best, k)
    return best
