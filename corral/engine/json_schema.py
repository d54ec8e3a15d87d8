"""The JSON Schema subset Corral can hold a model to, compiled into a graph of `Node`s.

Supported: type (one name or a list), object (properties, required, additionalProperties true /
false / a schema), array (items, minItems, maxItems), string (minLength, maxLength), number,
integer, boolean, null, enum and const of any JSON value, anyOf / oneOf, allOf with one member,
$ref to "#", "#/$defs/..." or "#/definitions/...", nullable (OpenAPI). Annotations (title,
description, default, examples, format, ...) and unknown keywords are ignored, as JSON Schema
says. minimum / maximum / exclusiveMinimum / exclusiveMaximum are enforced while decoding (a bounded
number is written without an exponent). Validation keywords that cannot be enforced (pattern,
multipleOf, uniqueItems, ... : UNSUPPORTED) raise `SchemaError` up front, naming the keyword.

Choices made for the model's output (documented in docs/constrained.md):
- keys come in declared order; optional ones may be skipped; required ones must appear;
- without additionalProperties, an object with properties allows no other keys (like OpenAI's
  strict mode); with it, extra keys come after the declared ones and never repeat a declared name;
- oneOf is treated as anyOf (the alternatives are not checked for overlap).
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

from corral.errors import CorralError

MAX_STRING = 2048
"""Characters in a string value when the schema gives no maxLength (a model cannot loop inside one forever)."""
MAX_KEY = 128
"""Characters in a free object key (json_object mode, additionalProperties)."""

K_UNION, K_OBJECT, K_ARRAY, K_STRING, K_NUMBER, K_LITERAL, K_PENDING = range(7)

UNSUPPORTED = frozenset({
    "pattern", "patternProperties", "multipleOf",
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "propertyNames",
    "minProperties", "maxProperties", "uniqueItems", "contains", "minContains", "maxContains", "prefixItems",
    "additionalItems", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})
TYPE_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
    "maxLength", "enum", "const", "nullable", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaError(CorralError, ValueError):
    """A JSON Schema that constrained decoding cannot enforce; `keyword` names the offending keyword."""

    def __init__(self, message: str, *, keyword: str, where: str = "#"):
        self.keyword = keyword
        self.where = where
        super().__init__(f"{message} (keyword {keyword!r} at {where})")


class StrSpec:
    """What one kind of string allows: character bounds, and for keys the declared names it must not equal."""

    __slots__ = ("min", "max", "key", "exclude", "prefixes")

    def __init__(self, min_len: int, max_len: int, *, key: bool = False, exclude: frozenset[bytes] = frozenset()):
        self.min, self.max, self.key = min_len, max_len, key
        self.exclude = exclude
        """JSON-escaped names the string may not spell (a free key must not repeat a declared property)."""
        self.prefixes = frozenset(name[:i] for name in exclude for i in range(len(name) + 1))


class Node:
    """One schema position. Fields by kind: union alts; object props/extra/...; array items/min/max;
    string spec; number integer; literal choices/by_first (JSON-encoded values)."""

    __slots__ = ("kind", "alts", "props", "extra", "cands", "required_left", "more_keys", "key_spec", "items",
                 "min_items", "max_items", "spec", "integer", "bounds", "choices", "by_first")

    def __init__(self, kind: int, **fields: Any):
        self.kind = kind
        for name in self.__slots__[1:]:
            setattr(self, name, fields.get(name))


def literal(values: list[Any], where: str = "#", keyword: str = "enum") -> Node:
    try:
        choices = tuple(dict.fromkeys(
            json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() for v in values))
    except (TypeError, ValueError) as e:
        raise SchemaError(f"value is not JSON: {e}", keyword=keyword, where=where) from None
    if not choices:
        raise SchemaError("no value is allowed", keyword=keyword, where=where)
    by_first: dict[int, tuple[bytes, ...]] = {}
    for c in choices:
        by_first[c[0]] = by_first.get(c[0], ()) + (c,)
    return Node(K_LITERAL, choices=choices, by_first=by_first)


def object_node(props: list[tuple[bytes, Node]], required: set[bytes], extra: Node | None) -> Node:
    """Per position idx (how many declared keys are behind us) precompute what may come next."""
    n = len(props)
    cands, required_left = [], []
    for idx in range(n + 1):
        upto = next((j for j in range(idx, n) if props[j][0] in required), n - 1)
        cands.append(tuple((props[j][0], j) for j in range(idx, min(upto + 1, n))))
        required_left.append(any(props[j][0] in required for j in range(idx, n)))
    key_spec = StrSpec(0, MAX_KEY, key=bool(props), exclude=frozenset(p[0] for p in props))
    return Node(K_OBJECT, props=tuple(props), extra=extra, cands=tuple(cands), required_left=tuple(required_left),
                more_keys=tuple(idx < n or extra is not None for idx in range(n + 1)), key_spec=key_spec)


def _any() -> Node:
    any_node = Node(K_UNION)
    any_node.alts = (object_node([], set(), any_node), Node(K_ARRAY, items=any_node, min_items=0, max_items=None),
                     Node(K_STRING, spec=StrSpec(0, MAX_STRING)), Node(K_NUMBER, integer=False),
                     literal([True, False, None]))
    return any_node


ANY = _any()
"""Any JSON value."""
ANY_OBJECT = ANY.alts[0]
"""Any JSON object: OpenAI's json_object mode, Ollama's format "json"."""


_PY_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value: Any, name: str) -> bool:
    """Whether an enum value fits a type name, as JSON Schema counts it (true is not a number, 1.0 is an integer)."""
    if name in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return name == "number" or isinstance(value, int) or value.is_integer()
    return isinstance(value, _PY_TYPES[name])


def _name_bytes(name: str) -> bytes:
    return json.dumps(name, ensure_ascii=False)[1:-1].encode()


def _count(schema: dict, key: str, where: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SchemaError("must be a non-negative integer", keyword=key, where=where)
    return value


class _Compiler:
    def __init__(self, root: dict):
        self.root = root
        self.by_ref: dict[str, Node] = {}

    def node(self, schema: Any, where: str) -> Node:
        if schema is True or schema == {}:
            return ANY
        if not isinstance(schema, dict):
            what = "false allows no value" if schema is False else "a schema must be an object or a boolean"
            raise SchemaError(what, keyword=str(schema).lower() if schema is False else "type", where=where)
        for key in schema:
            if key in UNSUPPORTED:
                raise SchemaError(f"{key} cannot be enforced while decoding", keyword=key, where=where)
        if "$ref" in schema:
            self._alone(schema, "$ref", where)
            return self.ref(schema["$ref"], where)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError("allOf is supported with one schema only", keyword="allOf", where=where)
            self._alone(schema, "allOf", where)
            return self.node(parts[0], f"{where}/allOf/0")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise SchemaError("must be a non-empty list of schemas", keyword=key, where=where)
                self._alone(schema, key, where)
                return Node(K_UNION, alts=tuple(self.node(s, f"{where}/{key}/{i}") for i, s in enumerate(alts)))
        node = self.typed(schema, where)
        if schema.get("nullable") is True:
            node = Node(K_UNION, alts=(node, literal([None])))
        return node

    @staticmethod
    def _alone(schema: dict, keyword: str, where: str) -> None:
        others = sorted(set(schema) & (TYPE_KEYWORDS | {"$ref", "anyOf", "oneOf", "allOf"}) - {keyword})
        if others:
            raise SchemaError(f"{others[0]} beside {keyword} is not supported", keyword=others[0], where=where)

    def typed(self, schema: dict, where: str) -> Node:
        types = schema.get("type")
        if types is None:
            types = next((t for t, keys in _INFER if set(schema) & keys), None)
        if isinstance(types, str):
            types = [types]
        if types is not None and (not isinstance(types, list) or not types or any(t not in TYPES for t in types)):
            raise SchemaError(f"type must be one of {', '.join(TYPES)} or a list of them", keyword="type", where=where)
        for key in ("const", "enum"):
            if key in schema:
                values = [schema["const"]] if key == "const" else schema["enum"]
                if not isinstance(values, list):
                    raise SchemaError("must be a list", keyword=key, where=where)
                if "type" in schema:
                    values = [v for v in values if any(_is_type(v, t) for t in types)]
                return literal(values, where, key)
        if types is None:
            return ANY
        alts = [self.of_type(t, schema, where) for t in dict.fromkeys(types)]
        return alts[0] if len(alts) == 1 else Node(K_UNION, alts=tuple(alts))

    def of_type(self, name: str, schema: dict, where: str) -> Node:
        if name == "object":
            return self.obj(schema, where)
        if name == "array":
            items = schema.get("items", True)
            if isinstance(items, list):
                raise SchemaError("items as a list (tuple form) is not supported", keyword="items", where=where)
            lo, hi = _count(schema, "minItems", where, 0), _count(schema, "maxItems", where, None)
            if hi is not None and hi < lo:
                raise SchemaError("maxItems is below minItems", keyword="maxItems", where=where)
            return Node(K_ARRAY, items=self.node(items, f"{where}/items"), min_items=lo, max_items=hi)
        if name == "string":
            lo, hi = _count(schema, "minLength", where, 0), _count(schema, "maxLength", where, None)
            if hi is not None and hi < lo:
                raise SchemaError("maxLength is below minLength", keyword="maxLength", where=where)
            return Node(K_STRING, spec=StrSpec(lo, max(MAX_STRING, lo) if hi is None else hi))
        if name in ("number", "integer"):
            return Node(K_NUMBER, integer=name == "integer", bounds=_bounds(schema, where))
        return literal([True, False] if name == "boolean" else [None])

    def obj(self, schema: dict, where: str) -> Node:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise SchemaError("must be an object", keyword="properties", where=where)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("must be a list of names", keyword="required", where=where)
        missing = [r for r in required if r not in properties]
        if missing:
            raise SchemaError(f"required property {missing[0]!r} is not in properties", keyword="required", where=where)
        # Without additionalProperties an object that declares properties gets no others (OpenAI strict mode's rule).
        extra = schema.get("additionalProperties", not properties)
        extra_node = None if extra is False else self.node(extra, f"{where}/additionalProperties")
        props = [(_name_bytes(k), self.node(v, f"{where}/properties/{k}")) for k, v in properties.items()]
        return object_node(props, {_name_bytes(r) for r in required}, extra_node)

    def ref(self, ref: Any, where: str) -> Node:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError("only local references (#/$defs/...) are supported", keyword="$ref", where=where)
        if ref in self.by_ref:
            return self.by_ref[ref]
        target = self.resolve(ref, where)
        node = self.by_ref[ref] = Node(K_PENDING)
        built = self.node(target, ref)
        if built.kind == K_PENDING:
            raise SchemaError("$ref loop that never reaches a value", keyword="$ref", where=where)
        for slot in Node.__slots__:  # fill the placeholder in place: nodes built meanwhile point at it
            setattr(node, slot, getattr(built, slot))
        return node

    def resolve(self, ref: str, where: str) -> Any:
        target: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"{ref} points at nothing", keyword="$ref", where=where)
        return target


_INFER = (("object", frozenset({"properties", "required", "additionalProperties"})),
          ("array", frozenset({"items", "minItems", "maxItems"})),
          ("string", frozenset({"minLength", "maxLength"})),
          ("number", frozenset(BOUND_KEYWORDS)))


class Bounds(tuple):
    """(lo, lo_open, hi, hi_open): a number's range as exact Fractions; None = unbounded on that side."""

    __slots__ = ()

    def __new__(cls, lo, lo_open: bool, hi, hi_open: bool):
        return super().__new__(cls, (lo, lo_open, hi, hi_open))

    def holds(self, x: Fraction) -> bool:
        lo, lo_open, hi, hi_open = self
        return ((lo is None or (x > lo if lo_open else x >= lo))
                and (hi is None or (x < hi if hi_open else x <= hi)))


def _bounds(schema: dict, where: str) -> Bounds | None:
    """minimum / maximum / exclusiveMinimum / exclusiveMaximum (a number; or draft 4's boolean beside
    minimum / maximum) -> Bounds, or None when the schema has none. An empty range is a SchemaError."""
    given = {k: schema[k] for k in BOUND_KEYWORDS if k in schema}
    if not given:
        return None
    for key, value in given.items():
        if isinstance(value, bool) and key.startswith("exclusive"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value in (
                float("inf"), float("-inf")):
            raise SchemaError("must be a finite number", keyword=key, where=where)
    lo, lo_open = _side(given, "minimum", "exclusiveMinimum", max)
    hi, hi_open = _side(given, "maximum", "exclusiveMaximum", min)
    bounds = Bounds(lo, lo_open, hi, hi_open)
    if lo is not None and hi is not None and (lo > hi or lo == hi and (lo_open or hi_open)):
        raise SchemaError("the range allows no number", keyword="maximum" if "maximum" in given
                          else "exclusiveMaximum", where=where)
    return bounds


def _side(given: dict, inclusive: str, exclusive: str, tighter) -> tuple[Fraction | None, bool]:
    """One side's bound: the tighter of the inclusive and exclusive keywords (exclusive wins a tie)."""
    excl = given.get(exclusive)
    if isinstance(excl, bool):  # draft 4: exclusiveMinimum: true makes minimum exclusive
        value = given.get(inclusive)
        return (None, False) if value is None else (Fraction(str(value)), excl)
    sides = [(Fraction(str(given[inclusive])), False)] if inclusive in given else []
    if excl is not None:
        sides.append((Fraction(str(excl)), True))
    if not sides:
        return None, False
    best = tighter(v for v, _ in sides)
    return best, any(v == best and open_ for v, open_ in sides)


def _check_unions(root: Node) -> None:
    """Refuse anyOf / $ref loops that consume no input (A = anyOf[A, ...]): the recognizer would recurse forever."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.kind == K_UNION:
            path, frontier = set(), list(node.alts)
            while frontier:
                alt = frontier.pop()
                if alt is node:
                    raise SchemaError("anyOf / $ref loop that never reaches a value", keyword="anyOf")
                if alt.kind == K_UNION and id(alt) not in path:
                    path.add(id(alt))
                    frontier.extend(alt.alts)
        todo.extend(n for n in (*(node.alts or ()), *(p[1] for p in node.props or ()), node.extra, node.items) if n)


def compile_schema(schema: dict | bool | None) -> Node:
    """The root Node for a JSON Schema; None means any JSON object (OpenAI json_object, Ollama format "json")."""
    if schema is None:
        return ANY_OBJECT
    root = _Compiler(schema if isinstance(schema, dict) else {}).node(schema, "#")
    _check_unions(root)
    return root
