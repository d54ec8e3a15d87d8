"""Dialog records and the text of tool calls: client input in, validated Messages out; reply text back.

Client dicts come in OpenAI's or Ollama's shape; tool-call text goes both ways in the forms Llama 3.1
and 3.2 were trained on (<|python_tag|> JSON, built-in ``tool.call(...)``, ``<function=...>``, and
the 3.2 pythonic list). Python forms are read with ``ast`` as literals only; nothing is evaluated.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.errors import ChatFormatError

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
