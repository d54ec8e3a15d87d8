"""OpenAI request bodies -> checked records. Every bad field is collected, then ONE 400 names them all.

    parse_json(raw bytes)  -> dict            400: not JSON, or not a JSON object
    parse_chat(body)       -> ChatRequest     /v1/chat/completions  (problems listed, not raised)
    parse_completion(body) -> CompletionRequest   /v1/completions   (problems listed, not raised)
    parse_embedding(body)  -> EmbeddingRequest    /v1/embeddings

Unknown fields are ignored (clients send user, metadata, store, service_tier...). Checks that need
the model (logit_bias ids against the vocabulary, prompt + max_tokens against the context) run
after it is loaded, in openai.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.server.errors import BadRequest
from corral.server.jsonbody import parse_json
from corral.server.pool import parse_keep_alive

__all__ = ["parse_json", "parse_chat", "parse_completion", "parse_embedding"]

MAX_STOP = 4
MAX_N = 128  # SamplingParams' own bound; the queue bound (503) applies after it
MAX_TOP_LOGPROBS = 20
MAX_EMBED_INPUTS = 512  # OpenAI allows 2048; each input is a forward here, and a client may split its batch


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Fields:
    """Reads fields of one JSON object, recording a problem per bad field instead of stopping at the first."""

    def __init__(self, body: Mapping[str, Any]):
        self.body = body
        self.problems: list[tuple[str, str]] = []

    def bad(self, name: str, rule: str) -> None:
        self.problems.append((name, f"{name} must be {rule}, got {_shown(self.body.get(name))}"))

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def int(self, name: str, default: int | None = None, *, lo: int | None = None, hi: int | None = None):
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            self.bad(name, "an integer" + _range(lo, hi))
            return default
        return v

    def number(self, name: str, default: float | None = None, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False):
        v = self.body.get(name)
        if v is None:
            return default
        ok = _is_num(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
        if not ok:
            if lo_open:
                rule = f" in ({lo}, {hi}]" if hi is not None else f" > {lo}"
            else:
                rule = _range(lo, hi)
            self.bad(name, "a finite number" + rule)
            return default
        return float(v)

    def bool(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.bad(name, "true or false")
            return default
        return v

    def str(self, name: str, default: str | None = None) -> str | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            self.bad(name, "a string")
            return default
        return v

    def raise_if_bad(self) -> None:
        if self.problems:
            raise BadRequest(self.problems)


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


@dataclass
class Sampling:
    """The sampling fields chat and completions share (OpenAI names, plus top_k / min_p / repetition_penalty)."""

    max_tokens: int | None = None
    """None: up to the end of the context."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    """None: no log-probs; k: the chosen token's plus k alternatives."""

    def given(self) -> dict[str, Any]:
        """SamplingParams fields the request set (None = take the model's stored default or the engine's)."""
        names = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                 "repetition_penalty": self.repetition_penalty, "frequency_penalty": self.frequency_penalty,
                 "presence_penalty": self.presence_penalty, "seed": self.seed}
        return {k: v for k, v in names.items() if v is not None}


def read_sampling(f: Fields, *, chat: bool) -> Sampling:
    s = Sampling()
    max_tokens = f.int("max_tokens", lo=1)
    if chat and f.present("max_completion_tokens"):
        max_tokens = f.int("max_completion_tokens", lo=1)
    s.max_tokens = max_tokens
    s.temperature = f.number("temperature", lo=0, hi=2)
    s.top_p = f.number("top_p", lo=0, hi=1, lo_open=True)
    s.top_k = f.int("top_k", lo=0)
    s.min_p = f.number("min_p", lo=0, hi=1)
    s.repetition_penalty = f.number("repetition_penalty", lo=0, lo_open=True, hi=10)
    s.frequency_penalty = f.number("frequency_penalty", lo=-2, hi=2)
    s.presence_penalty = f.number("presence_penalty", lo=-2, hi=2)
    s.n = f.int("n", 1, lo=1, hi=MAX_N)
    s.seed = f.int("seed", lo=-(2**63), hi=2**63 - 1)  # torch's generator takes 64 bits; more was a 500
    s.stop = _read_stop(f)
    s.logit_bias = _read_logit_bias(f)
    if chat:
        wants = f.bool("logprobs")
        top = f.int("top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if top is not None and not wants:
            f.problems.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        s.logprobs = (top or 0) if wants else None
    else:  # the legacy endpoint: logprobs is the number of alternatives (0-5)
        s.logprobs = f.int("logprobs", lo=0, hi=5)
    return s


def _read_stop(f: Fields) -> list[str]:
    v = f.body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and len(v) <= MAX_STOP and all(isinstance(s, str) for s in v):
        return [s for s in v if s]
    f.bad("stop", f"a string or a list of at most {MAX_STOP} strings")
    return []


def _read_logit_bias(f: Fields) -> dict[int, float]:
    v = f.body.get("logit_bias")
    if v is None:
        return {}
    out: dict[int, float] = {}
    if isinstance(v, dict):
        for key, bias in v.items():
            token = key.strip() if isinstance(key, str) else ""
            if not (token.isdigit() and _is_num(bias) and -100 <= bias <= 100):
                break
            out[int(token)] = float(bias)
        else:
            return out
    f.bad("logit_bias", "an object of token ids (as strings) to numbers in [-100, 100]")
    return {}


@dataclass
class ResponseFormat:
    kind: str = "text"
    """"text" | "json_object" | "json_schema"."""
    schema: dict | None = None
    name: str | None = None


@dataclass
class ChatRequest:
    model: str | None
    messages: list
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict = "auto"
    """"none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}."""
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    keep_alive: float | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    """Bad fields found so far; the router adds the ones only the model can tell, then answers one 400."""


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    """One prompt, or a batch: each a string or a list of token ids."""
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    keep_alive: float | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list[str] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None


def _common(f: Fields) -> tuple[str | None, bool, bool, float | None]:
    model = f.str("model")
    stream = f.bool("stream")
    include_usage = False
    options = f.body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            f.bad("stream_options", 'an object like {"include_usage": true}')
        else:
            include_usage = bool(options.get("include_usage"))
    keep_alive = None
    try:
        keep_alive = parse_keep_alive(f.body.get("keep_alive"))
    except ValueError as exc:
        f.problems.append(("keep_alive", str(exc)))
    return model, stream, include_usage, keep_alive


def parse_chat(body: dict) -> ChatRequest:
    f = Fields(body)
    model, stream, include_usage, keep_alive = _common(f)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        f.bad("messages", "a non-empty list of messages")
        messages = []
    sampling = read_sampling(f, chat=True)
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(is_function_tool(t) for t in tools)):
        f.bad("tools", 'a list of {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        tools = None
    tool_choice = _read_tool_choice(f, tools or [])
    fmt = _read_response_format(f)
    if fmt.kind != "text" and tools and tool_choice != "none":
        f.problems.append(("response_format", "response_format json cannot be combined with tools "
                                              '(use tool_choice "none")'))
    return ChatRequest(model, messages, sampling, stream, include_usage, tools or None, tool_choice, fmt, keep_alive,
                       f.problems)


def is_function_tool(tool: Any) -> bool:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        return False
    fn = tool.get("function")
    return (isinstance(fn, dict) and isinstance(fn.get("name"), str) and bool(fn["name"])
            and isinstance(fn.get("parameters", {}), dict))


def _read_tool_choice(f: Fields, tools: list[dict]) -> str | dict:
    v = f.body.get("tool_choice")
    if v is None:
        return "auto"
    names = [t["function"]["name"] for t in tools]
    if v in ("none", "auto", "required"):
        if v == "required" and not tools:
            f.problems.append(("tool_choice", 'tool_choice "required" needs tools'))
        return v
    fn = v.get("function") if isinstance(v, dict) and v.get("type") == "function" else None
    if isinstance(fn, dict) and fn.get("name") in names:
        return {"type": "function", "function": {"name": fn["name"]}}
    f.bad("tool_choice", '"none", "auto", "required" or {"type": "function", "function": {"name": <one of tools>}}')
    return "auto"


def _read_response_format(f: Fields) -> ResponseFormat:
    v = f.body.get("response_format")
    if v is None:
        return ResponseFormat()
    kind = v.get("type") if isinstance(v, dict) else None
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind == "json_schema":
        spec = v.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict):
            return ResponseFormat("json_schema", spec.get("schema") or {}, spec.get("name"))
    f.bad("response_format", '{"type": "text"}, {"type": "json_object"} or '
                             '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    return ResponseFormat()


def parse_completion(body: dict) -> CompletionRequest:
    f = Fields(body)
    model, stream, include_usage, keep_alive = _common(f)
    prompts = _read_prompts(f)
    sampling = read_sampling(f, chat=False)
    echo = f.bool("echo")
    if f.present("suffix"):
        f.problems.append(("suffix", "suffix (fill-in-the-middle) is not supported"))
    if f.present("best_of") and f.body.get("best_of") != sampling.n:
        f.problems.append(("best_of", "best_of is not supported (use n)"))
    if len(prompts) * sampling.n > MAX_N:
        f.problems.append(("prompt", f"{len(prompts)} prompts x n={sampling.n} samples is over {MAX_N} "
                                     "completions per request"))
    return CompletionRequest(model, prompts, sampling, stream, include_usage, echo, keep_alive, f.problems)


def _read_prompts(f: Fields) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, token ids, a list of strings, a list of token id lists."""
    v = f.body.get("prompt")
    if isinstance(v, str) or (isinstance(v, list) and v and all(_is_int(t) for t in v)):
        return [v]
    if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(
            isinstance(p, list) and p and all(_is_int(t) for t in p) for p in v)):
        return list(v)
    f.bad("prompt", "a string, a list of token ids, or a non-empty list of either (a batch)")
    return [""]


def parse_embedding(body: dict) -> EmbeddingRequest:
    f = Fields(body)
    model = f.str("model")
    v = body.get("input")
    inputs: list = []
    if isinstance(v, str):
        inputs = [v]
    elif isinstance(v, list) and v and all(isinstance(s, str) for s in v):
        inputs = list(v)
    elif isinstance(v, list) and v and all(_is_int(t) for t in v):
        inputs = [list(v)]
    elif isinstance(v, list) and v and all(isinstance(r, list) and r and all(_is_int(t) for t in r) for r in v):
        inputs = [list(r) for r in v]
    else:
        f.bad("input", "a string, a non-empty list of strings, a list of token ids or a list of such lists")
    if len(inputs) > MAX_EMBED_INPUTS:
        f.problems.append(("input", f"input holds {len(inputs)} items; at most {MAX_EMBED_INPUTS} per request"))
    fmt = f.str("encoding_format", "float")
    if fmt not in ("float", "base64"):
        f.bad("encoding_format", '"float" or "base64"')
        fmt = "float"
    dims = f.int("dimensions", lo=1)
    f.raise_if_bad()
    return EmbeddingRequest(model, inputs, fmt, dims)
