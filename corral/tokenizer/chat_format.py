"""Chat formats: a dialog in, token ids for the model out; the model's reply back to a Message.

Llama 3 / 3.1 / 3.2 are laid out here token by token, the way Meta's reference ChatFormat does;
other models carry a Jinja ``chat_template`` (``template.py``). Both keep one rule: text that a
client controls (message content, tool arguments, tool definitions) is always encoded with
``allow_special=False``, so ``<|eot_id|>`` typed into a message is plain text, never a forged turn.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from corral.errors import ChatFormatError, ConfigError
from corral.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")
# Tools the Llama 3.1 models were trained to call by name (Meta's prompt format page);
# code_interpreter is switched on by "Environment: ipython" alone, so it is not on the Tools line.
SEARCH_TOOLS = ("brave_search", "wolfram_alpha")
BUILTIN_TOOLS = (*SEARCH_TOOLS, "code_interpreter")
TOOL_FORMATS = ("json", "function_tag", "python_list")
KNOWLEDGE_CUTOFF = "December 2023"


@dataclass
class ToolCall:
    """One call the assistant asks for. ``arguments`` is a JSON object (Ollama's shape, not OpenAI's string)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass
class Message:
    """One dialog turn. ``tool_call_id`` / ``name`` identify the call a ``tool`` message answers."""

    role: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


Dialog = Sequence[Message | Mapping]  # Message records or OpenAI/Ollama message dicts


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


# --- records from client input ------------------------------------------------------------


def to_messages(messages: Iterable[Message | Mapping]) -> list[Message]:
    """Validate a dialog (Message records or OpenAI/Ollama dicts); errors name the message index."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Iterable):
        raise ChatFormatError(f"messages must be a list of messages, got {type(messages).__name__}")
    return [_to_message(m, i) for i, m in enumerate(messages)]


def _to_message(obj: Message | Mapping, index: int) -> Message:
    if isinstance(obj, Message):
        fields = {"role": obj.role, "content": obj.content, "tool_calls": obj.tool_calls,
                  "tool_call_id": obj.tool_call_id, "name": obj.name}
    elif isinstance(obj, Mapping):
        fields = obj
    else:
        raise ChatFormatError(f"message {index}: expected a dict or Message, got {type(obj).__name__}")
    role = fields.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    raw_calls = fields.get("tool_calls") or []
    if raw_calls and role != "assistant":
        raise ChatFormatError(f"message {index}: only assistant messages carry tool_calls, not {role!r}")
    if not isinstance(raw_calls, list):
        raise ChatFormatError(f"message {index}: tool_calls must be a list, got {type(raw_calls).__name__}")
    calls = [_to_tool_call(c, index, j) for j, c in enumerate(raw_calls)]
    content = _content_text(fields.get("content"), index)
    if content is None:
        if not calls:  # OpenAI sends content null on an assistant turn that only calls tools
            raise ChatFormatError(f"message {index}: missing content")
        content = ""
    return Message(role, content, calls, _optional_str(fields, "tool_call_id", index),
                   _optional_str(fields, "name", index))


def _content_text(content: Any, index: int) -> str | None:
    if content is None:
        return None
    if isinstance(content, str):
        return content
    # OpenAI clients may send [{"type": "text", "text": ...}]; only text parts mean anything here.
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ChatFormatError(f"message {index}: content must be a string, got {type(content).__name__}")


def _optional_str(fields: Mapping, key: str, index: int) -> str | None:
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        raise ChatFormatError(f"message {index}: {key} must be a string, got {type(value).__name__}")
    return value


def _to_tool_call(obj: ToolCall | Mapping, index: int, j: int) -> ToolCall:
    where = f"message {index}: tool_calls[{j}]"
    if isinstance(obj, ToolCall):
        name, args, call_id = obj.name, obj.arguments, obj.id
    elif isinstance(obj, Mapping):
        fn = obj.get("function", obj)
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{where}: function must be an object")
        name, call_id = fn.get("name"), obj.get("id")
        args = fn.get("arguments", fn.get("parameters"))
    else:
        raise ChatFormatError(f"{where}: expected a dict or ToolCall, got {type(obj).__name__}")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}: missing function name")
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where}: arguments are not valid JSON ({e.msg})") from None
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise ChatFormatError(f"{where}: arguments must be a JSON object, got {type(args).__name__}")
    if call_id is not None and not isinstance(call_id, str):
        raise ChatFormatError(f"{where}: id must be a string")
    return ToolCall(name, args, call_id)


# --- tool calls as text -------------------------------------------------------------------


def render_tool_call(call: ToolCall, style: str) -> str:
    """One call as the model writes it (without <|python_tag|>); style is one of TOOL_FORMATS."""
    if call.name in SEARCH_TOOLS:
        return f"{call.name}.call({_py_kwargs(call)})"
    if call.name == "code_interpreter":
        code = call.arguments.get("code")
        if not isinstance(code, str):
            raise ChatFormatError("code_interpreter call needs a string argument 'code'")
        return code
    if style == "json":
        return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments}, ensure_ascii=False)
    if style == "function_tag":
        if not re.fullmatch(r"[^\s<>]+", call.name):
            raise ChatFormatError(f"tool name {call.name!r} cannot be written as <function=...>")
        return f"<function={call.name}>{json.dumps(call.arguments, ensure_ascii=False)}</function>"
    return f"{call.name}({_py_kwargs(call)})"


def _py_kwargs(call: ToolCall) -> str:
    if not call.name.isidentifier():
        raise ChatFormatError(f"tool name {call.name!r} is not a Python identifier")
    for key in call.arguments:
        if not key.isidentifier():
            raise ChatFormatError(f"tool {call.name!r}: argument {key!r} is not a Python identifier")
    return ", ".join(f"{k}={_py_literal(v)}" for k, v in call.arguments.items())


def _py_literal(value: Any) -> str:
    """A JSON value as a Python literal that ast.literal_eval reads back to the same value."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid Python escapes
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ChatFormatError(f"tool argument {value!r} has no literal form")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(str(k))}: {_py_literal(v)}" for k, v in value.items()) + "}"
    raise ChatFormatError(f"tool argument of type {type(value).__name__} is not JSON")


# --- replies back to messages -------------------------------------------------------------

_STOP_TEXT = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
_PYTHON_TAG = "<|python_tag|>"
_FUNCTION_TAG = re.compile(r"<function=([^\s<>]+)>(.*?)</function>", re.DOTALL)


def parse_reply(text: str) -> Message:
    """Assistant text -> Message, with tool calls in any Llama 3.x form parsed out.

    Understands ``<|python_tag|>`` + JSON ({"name", "parameters"|"arguments"}) or built-in
    ``tool.call(k="v")`` (anything else after the tag is code_interpreter code),
    ``<function=name>{json}</function>``, a bare JSON call, and the 3.2 list ``[f(a=1), g(b='x')]``.
    Python forms are read with ``ast``, literals only: nothing is evaluated.
    """
    text = _strip_stop_text(text)
    if _PYTHON_TAG in text:
        before, _, body = text.partition(_PYTHON_TAG)
        return Message("assistant", before.strip(), _parse_tagged_body(body.strip()))
    calls, rest = _parse_function_tags(text)
    if calls:
        return Message("assistant", rest.strip(), calls)
    stripped = text.strip()
    calls = _parse_json_calls(stripped) or _parse_python_list(stripped) or _parse_builtin_calls(stripped)
    if calls:
        return Message("assistant", "", calls)
    return Message("assistant", stripped)


def _strip_stop_text(text: str) -> str:
    text = text.rstrip()
    while text.endswith(_STOP_TEXT):
        text = text[: text.rindex("<|")].rstrip()
    return text


def _parse_tagged_body(body: str) -> list[ToolCall]:
    calls = _parse_json_calls(body) or _parse_builtin_calls(body, any_name=True) or _parse_python_list(body)
    if calls:
        return calls
    return [ToolCall("code_interpreter", {"code": body})] if body else []


def _parse_function_tags(text: str) -> tuple[list[ToolCall], str]:
    calls = []
    for match in _FUNCTION_TAG.finditer(text):
        args = _json_object(match.group(2))
        if args is None:
            return [], text  # a malformed call is left as text for the client to see
        calls.append(ToolCall(match.group(1), args))
    return calls, _FUNCTION_TAG.sub("", text)


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text) if text.strip() else {}
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _parse_json_calls(text: str) -> list[ToolCall]:
    """One or more JSON call objects, separated by whitespace, ';' or ','."""
    if not text.startswith("{"):
        return []
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            return []
        call = _json_call(obj)
        if call is None:
            return []
        calls.append(call)
        while pos < len(text) and (text[pos].isspace() or text[pos] in ";,"):
            pos += 1
    return calls


def _json_call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        args = _json_object(args)
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _parse_python_list(text: str) -> list[ToolCall]:
    """The Llama 3.2 form ``[f(a=1), g(b='x')]``."""
    if not (text.startswith("[") and text.endswith("]")):
        return []
    tree = _ast_or_none(text, "eval")
    if not isinstance(tree, ast.Expression) or not isinstance(tree.body, ast.List) or not tree.body.elts:
        return []
    calls = [_ast_call(node, attribute_call=False) for node in tree.body.elts]
    return calls if all(calls) else []


def _parse_builtin_calls(text: str, *, any_name: bool = False) -> list[ToolCall]:
    """``brave_search.call(query="...")`` statements; untagged text only for Meta's built-in names."""
    if not text.endswith(")"):
        return []
    tree = _ast_or_none(text, "exec")
    if not isinstance(tree, ast.Module) or not tree.body:
        return []
    calls = [_ast_call(s.value, attribute_call=True) if isinstance(s, ast.Expr) else None for s in tree.body]
    if not all(calls) or not (any_name or all(c.name in SEARCH_TOOLS for c in calls)):
        return []
    return calls


def _ast_or_none(text: str, mode: str) -> ast.AST | None:
    try:
        return ast.parse(text, mode=mode)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _ast_call(node: ast.AST, *, attribute_call: bool) -> ToolCall | None:
    """``name(k=literal, ...)`` or, with attribute_call, ``name.call(k=literal, ...)``; else None."""
    if not isinstance(node, ast.Call) or node.args:
        return None
    func = node.func
    if attribute_call:
        if not (isinstance(func, ast.Attribute) and func.attr == "call" and isinstance(func.value, ast.Name)):
            return None
        name = func.value.id
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        return None
    args = {}
    for kw in node.keywords:
        if kw.arg is None:  # **kwargs
            return None
        try:
            args[kw.arg] = _json_value(ast.literal_eval(kw.value))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
    return ToolCall(name, args)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not a JSON value")


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
