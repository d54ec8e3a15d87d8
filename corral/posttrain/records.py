"""Dataset rows in the forms people have, read into two record types: a chat and a preference pair.

Row forms (``ROW_FORMATS``; with format "auto" each row is recognised by its keys):
 - Alpaca: ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``;
 - ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}``;
 - messages: ``{"messages": [{"role", "content"}]}`` (OpenAI's shape);
 - prompt/completion: ``{"prompt", "completion"}``, each text or messages (TRL's prompt-completion rows);
 - preference: ``{"chosen", "rejected"}`` plus a prompt as ``prompt`` (text or messages), ``messages``,
   ``conversations`` or ``instruction``/``input``; chosen/rejected are text, one message or a list of
   messages. Without a prompt, chosen and rejected are whole dialogs (lists, or Anthropic HH transcripts
   "\\n\\nHuman: ...\\n\\nAssistant: ...") and their shared leading turns are the prompt.
Files are JSON arrays or JSONL, gzip-compressed or not (decided from the bytes, not the name). Every
malformed row is a DatasetError naming the file, the row (1-based) and the field.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import DatasetError

Dialog = list[dict[str, str]]
"""[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]"""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass
class ChatRecord:
    """One conversation to imitate: the loss is on its assistant turns."""

    messages: Dialog
    where: str
    """file:row, for errors raised after reading (rendering, template checks)."""


@dataclass
class PreferenceRecord:
    """A prompt and two continuations of it, ``chosen`` preferred over ``rejected``."""

    prompt: Dialog
    chosen: Dialog
    rejected: Dialog
    where: str


@dataclass
class _Row:
    """A row being read: its fields and where it came from, so every error can say so."""

    data: dict[str, Any]
    path: str
    row: int

    def error(self, message: str, field: str | None = None) -> DatasetError:
        return DatasetError(message, path=self.path, row=self.row, field=field)

    def text(self, key: str, value: Any = None, *, required: bool = True) -> str:
        value = self.data.get(key) if value is None else value
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {type(value).__name__}", key)
        return value

    @property
    def where(self) -> str:
        return f"{self.path}:{self.row}"


# --- reading files --------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, parsed JSON value) of a JSON array or JSONL file, gzip or plain."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read it ({exc.strerror or exc})", path=str(path)) from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 text ({exc})", path=str(path)) from None
    if text.lstrip()[:1] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not valid JSON ({exc})", path=str(path)) from None
        yield from enumerate(rows, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"not valid JSON ({exc.msg} at column {exc.colno})", path=str(path),
                                   row=number) from None


def detect_format(row: _Row) -> str:
    keys = row.data.keys()
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    for key, name in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
                      ("completion", "prompt_completion")):
        if key in keys:
            return name
    raise row.error(f"no known keys (has {', '.join(sorted(keys)) or 'none'}); expected instruction/output "
                    "(Alpaca), conversations (ShareGPT), messages, prompt/completion or chosen/rejected (preference)")


def read_records(paths: list[str], fmt: str = "auto", *, skip_bad: bool = False,
                 skipped: list[DatasetError] | None = None) -> list[ChatRecord | PreferenceRecord]:
    """Every row of every file as a record; ``fmt`` other than "auto" makes rows of another form errors.

    skip_bad: a malformed row is left out (its error appended to ``skipped``) instead of raised.
    """
    records: list[ChatRecord | PreferenceRecord] = []
    for path in paths:
        for number, data in read_rows(path):
            try:
                records.append(_record(_Row(data if isinstance(data, dict) else {}, str(path), number), data, fmt))
            except DatasetError as exc:
                if not skip_bad:
                    raise
                if skipped is not None:
                    skipped.append(exc)
    return records


def _record(row: _Row, data: Any, fmt: str) -> ChatRecord | PreferenceRecord:
    if not isinstance(data, dict):
        raise row.error(f"each row must be a JSON object, got {type(data).__name__}")
    kind = detect_format(row)
    if fmt != "auto" and kind != fmt:
        raise row.error(f"a {kind} row in a dataset declared as data.format = {fmt!r}")
    return ROW_FORMATS[kind](row)


# --- one reader per row form ----------------------------------------------------------------


def _alpaca_prompt(row: _Row) -> Dialog:
    """System, history turns and the instruction (with its input after a blank line) as messages."""
    instruction = row.text("instruction")
    extra = row.text("input", required=False)
    dialog: Dialog = []
    if row.data.get("system"):
        dialog.append({"role": "system", "content": row.text("system")})
    history = row.data.get("history") or []
    if not isinstance(history, list):
        raise row.error("must be a list of [user, assistant] pairs", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise row.error("must be a [user, assistant] pair of strings", f"history[{i}]")
        dialog += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    if not instruction.strip():
        raise row.error("is empty", "instruction")
    dialog.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
    return dialog


def alpaca_row(row: _Row) -> ChatRecord:
    output = row.text("output")
    if not output.strip():
        raise row.error("is empty", "output")
    return ChatRecord(_alpaca_prompt(row) + [{"role": "assistant", "content": output}], row.where)


def _sharegpt_turns(row: _Row, key: str = "conversations") -> Dialog:
    turns = row.data.get(key)
    if not isinstance(turns, list):
        raise row.error(f"must be a list of {{from, value}} turns, got {type(turns).__name__}", key)
    dialog: Dialog = []
    if row.data.get("system"):
        dialog.append({"role": "system", "content": row.text("system")})
    for i, turn in enumerate(turns):
        dialog.append(_sharegpt_turn(row, turn, f"{key}[{i}]"))
    return dialog


def _sharegpt_turn(row: _Row, turn: Any, field: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise row.error(f"must be a {{from, value}} object, got {type(turn).__name__}", field)
    if "role" in turn:  # some ShareGPT exports already use OpenAI's keys
        return _message(row, turn, field)
    speaker = turn.get("from")
    if speaker not in SHAREGPT_ROLES:
        raise row.error(f"unknown speaker {speaker!r} (expected one of {', '.join(SHAREGPT_ROLES)})", f"{field}.from")
    return {"role": SHAREGPT_ROLES[speaker], "content": row.text(f"{field}.value", turn.get("value"))}


def sharegpt_row(row: _Row) -> ChatRecord:
    return ChatRecord(_chat(row, _sharegpt_turns(row), "conversations"), row.where)


def _message(row: _Row, message: Any, field: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise row.error(f"must be a {{role, content}} object, got {type(message).__name__}", field)
    if "from" in message and "role" not in message:
        return _sharegpt_turn(row, message, field)
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise row.error(f"unknown role {role!r} (expected one of {', '.join(MESSAGE_ROLES)})", f"{field}.role")
    return {"role": role, "content": row.text(f"{field}.content", message.get("content"))}


def _messages(row: _Row, value: Any, field: str) -> Dialog:
    if not isinstance(value, list):
        raise row.error(f"must be a list of messages, got {type(value).__name__}", field)
    return [_message(row, m, f"{field}[{i}]") for i, m in enumerate(value)]


def messages_row(row: _Row) -> ChatRecord:
    return ChatRecord(_chat(row, _messages(row, row.data.get("messages"), "messages"), "messages"), row.where)


def prompt_completion_row(row: _Row) -> ChatRecord:
    prompt = row.data.get("prompt")
    if prompt is None:
        raise row.error("is missing (a completion row needs its prompt)", "prompt")
    dialog = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(row, prompt, "prompt")
    return ChatRecord(_chat(row, dialog + _completion(row, "completion"), "completion"), row.where)


def _chat(row: _Row, dialog: Dialog, field: str) -> Dialog:
    """A conversation must have an assistant turn to learn from."""
    if not any(m["role"] == "assistant" for m in dialog):
        raise row.error("has no assistant turn to train on", field)
    return dialog


# --- preference pairs -----------------------------------------------------------------------


def _completion(row: _Row, field: str) -> Dialog:
    value = row.data.get(field)
    if isinstance(value, str):
        if _HH_TURN.match(value):
            return parse_transcript(row, value, field)
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [_message(row, value, field)]
    if isinstance(value, list):
        return _messages(row, value, field)
    raise row.error(f"must be text, a message or a list of messages, got {type(value).__name__}", field)


def _preference_prompt(row: _Row) -> Dialog | None:
    data = row.data
    if "prompt" in data:
        value = data["prompt"]
        return [{"role": "user", "content": value}] if isinstance(value, str) else _messages(row, value, "prompt")
    if "messages" in data:
        return _messages(row, data["messages"], "messages")
    if "conversations" in data:
        return _sharegpt_turns(row)
    if "instruction" in data:
        return _alpaca_prompt(row)
    return None


def preference_row(row: _Row) -> PreferenceRecord:
    for key in ("chosen", "rejected"):
        if key not in row.data:
            raise row.error("is missing (a preference row needs both chosen and rejected)", key)
    prompt = _preference_prompt(row)
    chosen, rejected = _completion(row, "chosen"), _completion(row, "rejected")
    if prompt is None:  # whole dialogs: the shared leading turns are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant" or not side[-1]["content"].strip():
            raise row.error("must end with a non-empty assistant turn", key)
    if not prompt:
        raise row.error("no prompt: give prompt, messages or conversations, or whole dialogs sharing their "
                        "first turns", "prompt")
    return PreferenceRecord(prompt, chosen, rejected, row.where)


def parse_transcript(row: _Row, text: str, field: str) -> Dialog:
    """Anthropic HH text "\\n\\nHuman: ...\\n\\nAssistant: ..." as user/assistant messages."""
    pieces = _HH_TURN.split(text)  # ["", "Human", text, "Assistant", text, ...]
    if pieces[0].strip():
        raise row.error("a transcript must start with \"\\n\\nHuman:\"", field)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": body.strip()} for speaker, body in zip(pieces[1::2], pieces[2::2])]


ROW_FORMATS: dict[str, Callable[[_Row], ChatRecord | PreferenceRecord]] = {
    "alpaca": alpaca_row,
    "sharegpt": sharegpt_row,
    "messages": messages_row,
    "prompt_completion": prompt_completion_row,
    "preference": preference_row,
}
"""Row form -> its reader (``data.format`` names one; "auto" picks by keys, see detect_format)."""


def substitute(records: list, placeholders: dict[str, str], system: str) -> list:
    """Fill ``{{key}}`` placeholders in every message and put a default system message first where none is."""

    def fix(dialog: Dialog, lead: bool) -> Dialog:
        out = []
        for m in dialog:
            content = m["content"]
            for key, value in placeholders.items():
                content = content.replace("{{" + key + "}}", value)
            out.append({**m, "content": content})
        if lead and system and (not out or out[0]["role"] != "system"):
            out.insert(0, {"role": "system", "content": system})
        return out

    fixed = []
    for r in records:
        if isinstance(r, ChatRecord):
            fixed.append(ChatRecord(fix(r.messages, True), r.where))
        else:
            fixed.append(PreferenceRecord(fix(r.prompt, True), fix(r.chosen, False), fix(r.rejected, False), r.where))
    return fixed
