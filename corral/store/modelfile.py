"""The Modelfile: Ollama's recipe for a stored model, parsed strictly.

    FROM ./model.gguf            # a GGUF file, an HF or Meta directory, or a stored model name
    PARAMETER temperature 0.2    # repeatable; `stop` may appear several times
    SYSTEM \"\"\"You are terse.\"\"\"
    TEMPLATE \"\"\"{{ ... }}\"\"\"   # a Jinja chat template (Go templates are not supported)
    ADAPTER ./lora.safetensors
    LICENSE \"\"\"...\"\"\"
    MESSAGE user Hello

Instructions are case-insensitive; an argument is the rest of the line, a "quoted" string, or a
\"\"\"triple-quoted\"\"\" block that may span lines. Unknown instructions, unknown parameters and
values of the wrong type are errors that name the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.errors import FormatError

# Ollama parameter -> (type, Corral sampling keyword or None when stored but not applied).
PARAMETERS: dict[str, tuple[type, str | None]] = {
    "temperature": (float, "temperature"),
    "top_p": (float, "top_p"),
    "top_k": (int, "top_k"),
    "min_p": (float, "min_p"),
    "repeat_penalty": (float, "repetition_penalty"),
    "presence_penalty": (float, "presence_penalty"),
    "frequency_penalty": (float, "frequency_penalty"),
    "seed": (int, "seed"),
    "num_predict": (int, "max_new_tokens"),
    "stop": (str, "stop"),
    "num_ctx": (int, None),
    "repeat_last_n": (int, None),
}
MAX_INT = 2**63 - 1
PARAMETER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda x: x >= 0, ">= 0"), "top_p": (lambda x: 0 < x <= 1, "in (0, 1]"),
    "min_p": (lambda x: 0 <= x <= 1, "in [0, 1]"), "repeat_penalty": (lambda x: x > 0, "> 0"),
    "presence_penalty": (lambda x: -2 <= x <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda x: -2 <= x <= 2, "in [-2, 2]"),
    "num_predict": (lambda n: n >= 1 or n in (-1, -2), "a positive integer, -1 or -2"),
    "num_ctx": (lambda n: n >= 1, "a positive integer"), "repeat_last_n": (lambda n: n >= -1, "an integer >= -1"),
    "top_k": (lambda n: n >= 0, "an integer >= 0"), "seed": (lambda n: abs(n) <= MAX_INT, "a 64-bit integer"),
}
"""The values each numeric parameter may take, here and in a request's Ollama ``options``."""
ROLES = ("system", "user", "assistant")
INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "license", "message")
MAX_MODELFILE_BYTES = 1 << 20


@dataclass
class Modelfile:
    from_: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Typed values; `stop` is a list of strings."""
    template: str | None = None
    system: str | None = None
    adapters: list[str] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)


def parse_parameter(name: str, value: str, where: str = "") -> Any:
    """A PARAMETER value in its declared type ('0.7' -> 0.7); FormatError for unknown names or bad values."""
    key = name.lower()
    if key not in PARAMETERS:
        raise FormatError(f"unknown parameter {name!r}; known: {', '.join(PARAMETERS)}", field=where or name)
    kind = PARAMETERS[key][0]
    if kind is str:
        return value
    try:
        parsed = kind(value)
    except ValueError:
        raise FormatError(f"parameter {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                          field=where or name) from None
    ok, rule = PARAMETER_RULES.get(key, (lambda v: True, ""))
    if kind is float and not math.isfinite(parsed):  # 1e999 parses as inf; stored, it fails at every use
        raise FormatError(f"parameter {key} must be a finite number, got {value!r}", field=where or name)
    if abs(parsed) > MAX_INT or not ok(parsed):
        rule = rule or "an integer of at most 64 bits"
        raise FormatError(f"parameter {key} must be {'a number ' if kind is float else ''}{rule}, got {value!r}",
                          field=where or name)
    return parsed


def _argument(text: str, lines: list[str], i: int, where: str) -> tuple[str, int]:
    """The argument starting in `text` (rest of line i); returns (value, index of the last line used)."""
    if text.startswith('"""'):
        rest = text[3:]
        if '"""' in rest:
            return rest[: rest.index('"""')], i
        parts = [rest]
        for j in range(i + 1, len(lines)):
            if '"""' in lines[j]:
                parts.append(lines[j][: lines[j].index('"""')])
                return "\n".join(parts), j
            parts.append(lines[j])
        raise FormatError('unterminated """ block', field=where)
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise FormatError(f"bad quoted string {text[:60]!r}", field=where) from None
        if not isinstance(value, str):
            raise FormatError(f"bad quoted string {text[:60]!r}", field=where)
        return value, i
    return text, i


def _apply(mf: Modelfile, command: str, arg: str, value: str, where: str) -> None:
    """One instruction; for PARAMETER and MESSAGE `arg` is the name or role and `value` the rest."""
    if command == "from":
        if mf.from_:
            raise FormatError("more than one FROM", field=where)
        mf.from_ = arg
    elif command == "parameter":
        parsed = parse_parameter(arg, value, where)
        if arg.lower() == "stop":
            mf.parameters.setdefault("stop", []).append(parsed)
        else:
            mf.parameters[arg.lower()] = parsed
    elif command in ("template", "system"):
        setattr(mf, command, arg)
    elif command == "adapter":
        mf.adapters.append(arg)
    elif command == "license":
        mf.licenses.append(arg)
    else:  # message
        if arg.lower() not in ROLES:
            raise FormatError(f"MESSAGE role must be one of {', '.join(ROLES)}, got {arg[:40]!r}", field=where)
        mf.messages.append({"role": arg.lower(), "content": value})


def parse_modelfile(text: str, path: str | None = None) -> Modelfile:
    """Parse a Modelfile; FormatError names the line that is wrong."""
    if len(text) > MAX_MODELFILE_BYTES:
        raise FormatError(f"Modelfile is over {MAX_MODELFILE_BYTES} bytes", path=path)
    mf, lines, i = Modelfile(), text.splitlines(), 0
    while i < len(lines):
        line, where = lines[i].strip(), f"line {i + 1}"
        if line and not line.startswith("#"):
            command, _, rest = line.partition(" ")
            command = command.lower()
            if command not in INSTRUCTIONS:
                raise FormatError(f"unknown instruction {command.upper()[:40]!r}", path=path, field=where)
            rest, value = rest.strip(), ""
            if command in ("parameter", "message"):
                rest, _, value = rest.partition(" ")
                value, i = _argument(value.strip(), lines, i, where)
                if not value and command == "parameter":
                    raise FormatError(f"PARAMETER {rest} needs a value", path=path, field=where)
            else:
                rest, i = _argument(rest, lines, i, where)
            if not rest.strip():
                raise FormatError(f"{command.upper()} needs an argument", path=path, field=where)
            _apply(mf, command, rest, value, where)
        i += 1
    if not mf.from_:
        raise FormatError("no FROM instruction", path=path)
    return mf


def _quote(text: str) -> str:
    return f'"""{text}"""' if ("\n" in text or '"' in text or not text.strip()) else text


def render_modelfile(mf: Modelfile) -> str:
    """The Modelfile text that recreates `mf` (used by `corral show --modelfile`)."""
    out = [f"FROM {mf.from_}"]
    if mf.template is not None:
        out.append(f"TEMPLATE {_quote(mf.template)}")
    if mf.system is not None:
        out.append(f"SYSTEM {_quote(mf.system)}")
    for name, value in mf.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            out.append(f"PARAMETER {name} {json.dumps(item) if isinstance(item, str) else item}")
    out += [f"ADAPTER {a}" for a in mf.adapters]
    out += [f"LICENSE {_quote(text)}" for text in mf.licenses]
    out += [f"MESSAGE {m['role']} {_quote(m['content'])}" for m in mf.messages]
    return "\n".join(out) + "\n"
