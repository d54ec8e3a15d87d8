"""Chat formats: a dialog in, token ids for the model out; the model's reply back to a Message.

Llama 3 / 3.1 / 3.2 are laid out here token by token, the way Meta's reference ChatFormat does;
other models carry a Jinja ``chat_template`` (``template.py``). Both keep one rule: text that a
client controls (message content, tool arguments, tool definitions) is always encoded with
``allow_special=False``, so ``<|eot_id|>`` typed into a message is plain text, never a forged turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from corral.errors import ChatFormatError, ConfigError
from corral.tokenizer import Tokenizer
from corral.tokenizer.messages import (
    BUILTIN_TOOLS,
    KNOWLEDGE_CUTOFF,
    SEARCH_TOOLS,
    TOOL_FORMATS,
    Dialog,
    Message,
    ToolCall,
    parse_reply,
    render_tool_call,
    to_messages,
)

# Records and tool-call text live in messages.py; they are re-exported here for callers of the formats.
__all__ = ["ChatFormat", "Dialog", "Llama3ChatFormat", "Message", "ToolCall", "parse_reply", "render_tool_call",
           "to_messages"]


@runtime_checkable
class ChatFormat(Protocol):
    """What the engine and server need from a model's dialog format."""

    stop_ids: frozenset[int]

    def encode_dialog(
        self, messages: Dialog, *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]: ...

    def render(
        self, messages: Dialog, *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str: ...

    def parse_reply(self, text: str) -> Message: ...




# --- Llama 3 ------------------------------------------------------------------------------

# The tool instructions of Meta's Llama 3.1 / 3.2 prompt format pages; the models were tuned on them.
_JSON_TOOLS_PROMPT = (
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n{functions}\n\n"
    "Return function calls in JSON format."
)
_FUNCTION_TAG_TOOLS_PROMPT = (
    "You have access to the following functions:\n\n{functions}\n\n"
    "Think very carefully before calling functions.\n"
    "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
    '<function=example_function_name>{{"example_name": "example_value"}}</function>\n\n'
    "Reminder:\n"
    "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
    "- Required parameters MUST be specified\n"
    "- Only call one function at a time\n"
    "- Put the entire function call reply on one line"
)
_PYTHON_LIST_TOOLS_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the function can be used, point it out. If the given question lacks the parameters required "
    "by the function, also point it out. You should only return the function call in tools call sections.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "You SHOULD NOT include any other text in the response.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n\n{functions}"
)

Segment = tuple[str, bool]  # (text, is_special_token)


class Llama3ChatFormat:
    """Meta's Llama 3 layout: ``<|begin_of_text|>``, then per message
    ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``, then an open
    assistant header. Versions "3.1"/"3.2" add tools, the ``ipython`` role and ``<|eom_id|>``.

    ``tool_format`` is how custom tool calls are written: "json" (3.1 default), "function_tag",
    "python_list" (3.2 default). ``today`` fills the "Today Date:" line of a tool system prompt.
    """

    def __init__(
        self, tokenizer: Tokenizer, version: str = "3.1", *, tool_format: str | None = None, today: str | None = None
    ):
        if version not in ("3.0", "3.1", "3.2"):
            raise ConfigError(f"chat format version must be 3.0, 3.1 or 3.2, got {version!r}")
        tool_format = tool_format or ("python_list" if version == "3.2" else "json")
        if tool_format not in TOOL_FORMATS:
            raise ConfigError(f"tool_format must be one of {', '.join(TOOL_FORMATS)}, got {tool_format!r}")
        self.tokenizer, self.version, self.tool_format, self.today = tokenizer, version, tool_format, today
        # 3.0 ends turns with eot only; 3.1 also stops at eom after a tool call. end_of_text ends base models.
        stops = ("<|end_of_text|>", "<|eot_id|>") + (() if version == "3.0" else ("<|eom_id|>",))
        self.stop_ids = frozenset(tokenizer.token_id(t) for t in stops)

    def encode_dialog(
        self, messages: Dialog, *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        ids: list[int] = []
        for text, special in self._segments(messages, add_generation_prompt, tools):
            if special:
                ids.append(self.tokenizer.token_id(text))
            elif text:  # each piece on its own, as Meta's reference encodes role, "\n\n" and content apart
                ids.extend(self.tokenizer.encode(text, allow_special=False))
        return ids

    def render(
        self, messages: Dialog, *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        return "".join(text for text, _ in self._segments(messages, add_generation_prompt, tools))

    def parse_reply(self, text: str) -> Message:
        return parse_reply(text)

    def _segments(self, messages, add_generation_prompt: bool, tools) -> list[Segment]:
        msgs = to_messages(messages)
        builtins, functions = _check_tools(tools)
        if self.version == "3.0":
            _refuse_tools(msgs, tools)
        segs: list[Segment] = [("<|begin_of_text|>", True)]
        start = 0
        if builtins or functions:
            has_system = bool(msgs) and msgs[0].role == "system"
            system, user_prompt = self._tool_prompts(msgs[0].content if has_system else "", builtins, functions)
            segs += _plain_message("system", system)
            if user_prompt:  # 3.1 puts custom tool definitions in a user message of their own
                segs += _plain_message("user", user_prompt)
            start = int(has_system)
        for i in range(start, len(msgs)):
            segs += self._message_segments(msgs[i], i)
        if add_generation_prompt:
            segs += _header("assistant")
        return segs

    def _message_segments(self, m: Message, index: int) -> list[Segment]:
        role = "ipython" if m.role == "tool" else m.role
        content = m.content.strip()  # Meta's ChatFormat strips content
        if not m.tool_calls:
            return _plain_message(role, content)
        try:
            return _header(role) + self._tool_call_segments(m.tool_calls, content)
        except ChatFormatError as e:
            raise ChatFormatError(f"message {index}: {e}") from None

    def _tool_call_segments(self, calls: list[ToolCall], content: str) -> list[Segment]:
        builtin = [c.name in BUILTIN_TOOLS for c in calls]
        if any(builtin) and not all(builtin):
            raise ChatFormatError("built-in and custom tool calls cannot share one message")
        if len(calls) > 1 and any(c.name == "code_interpreter" for c in calls):
            raise ChatFormatError("a code_interpreter call must be the only call of its message")
        if all(builtin) or self.tool_format == "json":
            # <|python_tag|>call<|eom_id|>: the model waits for the ipython result
            body = "; ".join(render_tool_call(c, "json") for c in calls)
            return [(content, False), ("<|python_tag|>", True), (body, False), ("<|eom_id|>", True)]
        if self.tool_format == "function_tag":
            body = "".join(render_tool_call(c, "function_tag") for c in calls)
        else:
            body = "[" + ", ".join(render_tool_call(c, "python_list") for c in calls) + "]"
        return [(content, False), (body, False), ("<|eot_id|>", True)]

    def _tool_prompts(self, system: str, builtins: list[str], functions: list[dict]) -> tuple[str, str]:
        """(system message text, user message text or "") that switch tools on, as Meta's pages show."""
        lines = []
        if builtins or self.tool_format != "python_list":
            lines.append("Environment: ipython")
        search = [n for n in SEARCH_TOOLS if n in builtins]
        if search:
            lines.append("Tools: " + ", ".join(search))
        lines.append(f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}")
        if self.today:
            lines.append(f"Today Date: {self.today}")
        blocks, user_prompt = ["\n".join(lines)], ""
        if functions and self.tool_format == "python_list":
            specs = json.dumps([t["function"] for t in functions], indent=4, ensure_ascii=False)
            blocks.append(_PYTHON_LIST_TOOLS_PROMPT.format(functions=specs))
        elif functions and self.tool_format == "json":
            specs = "\n\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in functions)
            user_prompt = _JSON_TOOLS_PROMPT.format(functions=specs)
        elif functions:
            specs = "\n\n".join(f"Use the function '{t['function']['name']}' to "
                                f"'{t['function'].get('description', '')}':\n"
                                f"{json.dumps(t['function'], ensure_ascii=False)}" for t in functions)
            user_prompt = _FUNCTION_TAG_TOOLS_PROMPT.format(functions=specs)
        if system.strip():
            blocks.append(system.strip())
        return "\n\n".join(blocks), user_prompt


def _header(role: str) -> list[Segment]:
    return [("<|start_header_id|>", True), (role, False), ("<|end_header_id|>", True), ("\n\n", False)]


def _plain_message(role: str, content: str) -> list[Segment]:
    return _header(role) + [(content, False), ("<|eot_id|>", True)]


def _check_tools(tools: Any) -> tuple[list[str], list[dict]]:
    """Split an OpenAI/Ollama ``tools`` list into built-in names and function definitions."""
    if tools is None:
        return [], []
    if not isinstance(tools, list):
        raise ChatFormatError(f"tools must be a list, got {type(tools).__name__}")
    builtins, functions = [], []
    for k, tool in enumerate(tools):
        kind = tool.get("type", "function") if isinstance(tool, Mapping) else None
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if kind in BUILTIN_TOOLS:
            builtins.append(kind)
        elif kind == "function" and isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and fn["name"]:
            functions.append(dict(tool))
        else:
            raise ChatFormatError(f"tools[{k}]: expected {{'type': 'function', 'function': {{'name': ...}}}} "
                                  f"or a built-in type ({', '.join(BUILTIN_TOOLS)})")
    return builtins, functions


def _refuse_tools(msgs: list[Message], tools: Any) -> None:
    if tools:
        raise ChatFormatError("Llama 3.0 has no tool calling; use chat format version 3.1 or later")
    for i, m in enumerate(msgs):
        if m.tool_calls or m.role in ("tool", "ipython"):
            raise ChatFormatError(f"message {i}: Llama 3.0 has no tool calls or tool results (needs 3.1 or later)")
