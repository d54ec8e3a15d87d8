"""Ollama request fields -> Corral's: ``options`` -> SamplingParams and a context limit, ``format`` -> a constraint.

    Ollama option        Corral                                   (docs/ollama.md)
    temperature, top_k, top_p, min_p, presence_penalty, frequency_penalty: same name
    seed                 seed (-1: a random seed, as in Ollama)
    repeat_penalty       repetition_penalty (over the whole prompt and answer: there is no window)
    num_predict          max_new_tokens; -1 and -2 (Ollama's "forever" and "fill the context"): until the
                         context ends, since Corral never shifts the context
    stop                 stop strings
    num_ctx              the request's context (prompt + answer); above the model's context -> 400
    repeat_last_n        accepted and ignored (SamplingParams has no penalty window)

Options that only say *how* to run (num_gpu, num_thread, use_mmap, ...) are accepted and ignored;
sampling options Corral lacks (mirostat, tfs_z, typical_p) are accepted only at their "off" value;
anything else is a 400 naming every such option. The Modelfile's PARAMETERs are the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.engine.sampling import SamplingError, SamplingParams
from corral.server.errors import BadRequest
from corral.store.modelfile import PARAMETER_RULES

# Ollama's own defaults where a client leaves an option out (api/types.go DefaultOptions).
DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
FLOATS = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
INTS = ("seed", "num_predict", "top_k", "num_ctx", "repeat_last_n")
RENAMED = {"repeat_penalty": "repetition_penalty"}
IGNORED = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                     "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "penalize_newline"})
"""Runtime options: they change speed or memory in llama.cpp, never which tokens come out here."""
OFF_VALUES = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
"""Sampling options Corral does not implement: only the value that switches them off is accepted."""


@dataclass
class Options:
    """Checked options (Ollama names, typed); the sampling plan is made once the prompt's length is known."""

    values: dict[str, Any]
    stop: list[str]

    def plan(self, prompt_tokens: int, model_context: int) -> SamplingPlan:
        return plan_sampling(self, prompt_tokens, model_context)


@dataclass
class SamplingPlan:
    params: SamplingParams
    stop: list[str]
    context: int
    """Tokens this request may fill, prompt + answer: num_ctx or the model's context."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> int | None:
    """An int, or a float with an integral value (JSON clients send 40.0); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _check(name: str, value: Any) -> tuple[Any, str | None]:
    """(typed value, problem or None) for one known option."""
    if name == "stop":
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(s, str) for s in value)
        return value, None if ok else "stop must be a string or a list of strings"
    ok, rule = PARAMETER_RULES[name]
    if name in FLOATS:
        return value, None if _number(value) and ok(value) else f"{name} must be a finite number {rule}, got {value!r}"
    number = _integer(value)
    if number is None:
        return value, f"{name} must be an integer, got {value!r}"
    return number, None if ok(number) else f"{name} must be {rule}, got {value!r}"


def parse_options(raw: Any, stored: Mapping[str, Any] | None = None) -> Options:
    """Check a request's ``options`` over the model's stored PARAMETERs; BadRequest names every bad option."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise BadRequest([("options", f"options must be an object, got {type(raw).__name__}")])
    values: dict[str, Any] = {**DEFAULTS, **{k: v for k, v in (stored or {}).items() if k in FLOATS + INTS}}
    stop = list((stored or {}).get("stop") or [])
    problems: list[tuple[str, str]] = []
    for name, value in raw.items():
        if value is None or name in IGNORED:
            continue
        if name in OFF_VALUES:
            if not (_number(value) and value == OFF_VALUES[name]):
                problems.append((name, f"{name} is not supported (only {OFF_VALUES[name]}, which turns it off)"))
            continue
        if name not in FLOATS + INTS + ("stop",):
            problems.append((name, f"unknown option {name!r}"))
            continue
        typed, problem = _check(name, value)
        if problem:
            problems.append((name, problem))
        elif name == "stop":
            stop = typed
        else:
            values[name] = typed
    if problems:
        raise BadRequest(problems)
    return Options(values, [s for s in stop if s])


def plan_sampling(options: Options, prompt_tokens: int, model_context: int) -> SamplingPlan:
    """SamplingParams for a prompt of `prompt_tokens`; 400 when prompt + num_predict do not fit (never truncated)."""
    v = options.values
    context = v.get("num_ctx", model_context)
    if context > model_context:
        raise BadRequest([("num_ctx", f"num_ctx {context} is over this model's context of {model_context} tokens")])
    where = f"num_ctx {context}" if "num_ctx" in v else f"the model's context of {context} tokens"
    if prompt_tokens >= context:
        raise BadRequest([("prompt", f"the prompt has {prompt_tokens} tokens; {where} leaves no room for an answer")],
                         code="context_length_exceeded")
    room = context - prompt_tokens
    predict = v.get("num_predict", -1)
    if predict > room:
        raise BadRequest([("num_predict", f"the prompt has {prompt_tokens} tokens and num_predict is {predict}: "
                                          f"{prompt_tokens + predict} is over {where}")],
                         code="context_length_exceeded")
    seed = v.get("seed")
    fields = {RENAMED.get(k, k): val for k, val in v.items() if k in FLOATS or k == "top_k"}
    try:
        params = SamplingParams(**fields, seed=None if seed in (None, -1) else seed,
                                max_new_tokens=room if predict < 0 else predict)
    except SamplingError as exc:  # ranges: temperature >= 0, top_p in (0, 1], ...
        raise BadRequest(_ollama_names(str(exc))) from None
    return SamplingPlan(params, options.stop, context)


def _ollama_names(message: str) -> list[tuple[str, str]]:
    """SamplingParams' problems ('repetition_penalty must be ...') in Ollama's option names."""
    back = {v: k for k, v in RENAMED.items()} | {"max_new_tokens": "num_predict"}
    out = []
    for part in message.split("; "):
        name = part.split(" ", 1)[0]
        out.append((back.get(name, name), part.replace(name, back.get(name, name), 1)))
    return out


def constraint_factory(fmt: Any, tokenizer: Any, vocab_size: int) -> Callable[[], Any] | None:
    """``format``: "json" (any JSON value) or a JSON schema -> a factory of per-request constraints."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        schema = None
    elif isinstance(fmt, dict):
        schema = fmt
    else:
        raise BadRequest([("format", f'format must be "json" or a JSON schema object, got {str(fmt)[:60]!r}')])
    from corral.engine.constrain import json_constraint

    json_constraint(tokenizer, schema, vocab_size=vocab_size)  # a schema it cannot follow is a 400 now, not mid-stream

    def make() -> Any:
        return json_constraint(tokenizer, schema, vocab_size=vocab_size)

    return make
