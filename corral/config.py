"""Every ``*Config`` loads the same way: TOML in, typed dataclasses out, unknown keys are errors.

``load_toml_config(PretrainConfig, "run.toml", ["--optim.lr=3e-4"])`` reads the file, applies
``--section.key=value`` overrides (the value parsed as TOML; a bare word is a string), then builds
the dataclass strictly: an unknown key, a table where a value belongs (or the reverse) and a value of
the wrong type are ConfigErrors that name the dotted key. A field whose type is itself a dataclass is
a TOML table; ``builders`` takes over for types that build differently (a model ``preset``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from corral.errors import ConfigError

T = TypeVar("T")
Builder = Callable[[Any, str], Any]
"""(raw TOML value, dotted key) -> the field's value."""


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``--optim.lr=3e-4`` in the nested dict; the value is parsed as TOML, else kept as a string."""
    text = item[2:] if item.startswith("--") else item
    key, sep, value_text = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a table")
    node[leaf] = value


def load_toml_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), *,
                     what: str = "config", builders: Mapping[Any, Builder] | None = None) -> T:
    """Read a TOML file (or start from the defaults), apply overrides, build ``cls`` strictly."""
    raw: dict[str, Any] = read_toml(path, f"{what} file") if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return from_dict(cls, raw, what=what, builders=builders)


def from_dict(cls: type[T], raw: Any, prefix: str = "", *, what: str = "config",
              builders: Mapping[Any, Builder] | None = None, base: T | None = None) -> T:
    """Build dataclass ``cls`` from a TOML table; ``base`` gives the defaults of fields not in it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or what} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown {what} key {dotted!r}; known: {', '.join(known)}")
        values[key] = typed(value, hints[key], dotted, what=what, builders=builders)
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def typed(value: Any, hint: Any, key: str, *, what: str = "config",
          builders: Mapping[Any, Builder] | None = None) -> Any:
    """Check a TOML value against a type hint (a dataclass, bool, int, float, str, list[X], dict, X | None)."""
    if builders and hint in builders:
        return builders[hint](value, key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key, what=what, builders=builders)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return typed(value, options[0], key, what=what, builders=builders)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            value = [value]  # a single path given on the command line
        return [typed(v, item, f"{key}[{i}]", what=what, builders=builders) for i, v in enumerate(value)]
    if _fits(value, origin or hint):
        return float(value) if hint is float else value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}")


def _fits(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (str, dict):
        return isinstance(value, kind)
    return True  # Any and other hints are taken as given


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able view (written next to a run's metrics so the run says how it was configured)."""
    return dataclasses.asdict(config)
