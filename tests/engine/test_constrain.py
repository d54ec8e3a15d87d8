"""Constrained JSON decoding: schema compiler, byte recognizer, token masks, and SmolLM2 end to end."""

from __future__ import annotations

import json
import time

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.engine.constrain import Grammar, JsonConstraint, SchemaError, Vocabulary, json_constraint, vocabulary
from corral.engine.json_grammar import MAX_DEPTH, MAX_INT_DIGITS, MAX_WS, can_end, feed, initial
from corral.engine.json_schema import MAX_STRING, compile_schema
from corral.errors import CorralError


def accepts(schema, text: str | bytes) -> bool:
    """The whole text is a value the schema allows (None = any JSON object)."""
    config = feed(initial(compile_schema(schema)), text.encode() if isinstance(text, str) else text)
    return bool(config) and can_end(config)


def obj(properties: dict, required=None, **more) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            **more}


INT, STRING = {"type": "integer"}, {"type": "string"}
CAT = obj({"name": {"type": "string", "maxLength": 40}, "age": INT,
           "tags": {"type": "array", "items": {"enum": ["fluffy", "grumpy"]}, "maxItems": 3}},
          required=["name", "age"], additionalProperties=False)


# ---- the recognizer, feature by feature -------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "{}", '{"a": 1}', '{"a":[1,-2.5e-3,{"b":null}],"c":true,"d":false}', '{"k": "\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9"}',
    '{"é😀": "ünï"}', '{\n"a": 0,\n"b": -0.0E+1\n}', '{"a": {"b": {"c": []}}}', '{"": ""}',
])
def test_any_object_accepts_json_objects(text):
    assert accepts(None, text)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("text", [
    b"[]", b"1", b'"a"', b"{", b'{"a":}', b'{"a":1,}', b"{'a':1}", b'{"a":01}', b'{"a":-}', b'{"a":1.}', b'{"a":.5}',
    b'{"a":1e}', b'{"a":tru}', b'{"a":"\x01"}', b'{"a":"\\x"}', b'{"a":"\\u12"}', b'{"a":1}}', b'{"a" 1}',
    b'{"a":"\xc3("}', b'{"a":"\xc0\xaf"}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}', b'{"a":"\x80"}',
    b'{"a":"\\ud83d\\ude00"}', b'{"a":NaN}', b'{"a":1 2}',
])
def test_any_object_rejects_other_values_and_broken_json(text):
    assert not accepts(None, text)


def test_properties_come_in_declared_order_and_required_ones_must_appear():
    assert accepts(CAT, '{"name": "Tom", "age": 3}')
    assert accepts(CAT, '{"name": "Tom", "age": 3, "tags": ["fluffy"]}')
    assert not accepts(CAT, '{"age": 3, "name": "Tom"}')  # order
    assert not accepts(CAT, '{"name": "Tom"}')  # age is required
    assert not accepts(CAT, '{"name": "Tom", "age": 3, "owner": "x"}')  # additionalProperties false
    assert not accepts(CAT, '{"name": "Tom", "age": 3, "tags": ["happy"]}')  # enum


def test_optional_properties_may_be_skipped():
    schema = obj({"a": INT, "b": INT, "c": INT}, required=["c"])
    for text in ('{"c": 1}', '{"a": 1, "c": 2}', '{"b": 1, "c": 2}', '{"a": 1, "b": 2, "c": 3}'):
        assert accepts(schema, text), text
    assert not accepts(schema, '{"a": 1}')
    assert not accepts(schema, '{}')


def test_properties_without_additional_properties_allow_no_other_keys():
    schema = {"type": "object", "properties": {"a": INT}}
    assert accepts(schema, '{"a": 1}') and accepts(schema, "{}")
    assert not accepts(schema, '{"b": 1}')


def test_additional_properties_schema_allows_new_names_after_the_declared_ones():
    schema = obj({"name": INT}, required=[], additionalProperties=STRING)
    assert accepts(schema, '{"name": 1, "nick": "x"}')
    assert accepts(schema, '{"nam": "x", "names": "y"}')  # prefixes and extensions of a declared name are new names
    assert not accepts(schema, '{"name": 1, "name": "x"}')  # a declared name again
    assert not accepts(schema, '{"nick": "x", "name": 1}')  # declared keys come first
    assert not accepts(schema, '{"name": 1, "nick": 2}')  # extra values follow additionalProperties
    assert not accepts(schema, '{"n\\u0061me": "x"}')  # free keys beside declared ones take no escapes


def test_arrays_respect_items_and_their_bounds():
    schema = {"type": "array", "items": INT, "minItems": 1, "maxItems": 3}
    assert accepts(schema, "[1]") and accepts(schema, "[1, 2, 3]") and accepts(schema, "[ 1 ,2 ]")
    assert not accepts(schema, "[]") and not accepts(schema, "[1,2,3,4]") and not accepts(schema, '[1, "a"]')
    assert accepts({"type": "array"}, '[1, "a", {"b": [null]}]')
    assert not accepts({"type": "array", "maxItems": 0}, "[1]") and accepts({"type": "array", "maxItems": 0}, "[]")


def test_string_lengths_count_characters_not_bytes():
    schema = {"type": "string", "minLength": 2, "maxLength": 3}
    assert accepts(schema, '"éé"') and accepts(schema, '"é😀x"') and accepts(schema, '"\\n\\u00e9"')
    assert not accepts(schema, '"é"') and not accepts(schema, '"éééé"') and not accepts(schema, '"\\n\\n\\n\\n"')


def test_enum_and_const_allow_exactly_their_values():
    schema = {"enum": [1, "a", None, {"k": [1, 2]}, True, 1.5]}
    for text in ('1', '"a"', "null", '{"k":[1,2]}', "true", "1.5"):
        assert accepts(schema, text), text
    for text in ("12", "2", '"b"', '{"k": [1,2]}', "false", "1.50"):
        assert not accepts(schema, text), text
    assert accepts({"const": "x"}, '"x"') and not accepts({"const": "x"}, '"xy"')
    typed_enum = {"type": "string", "enum": ["a", 1]}
    assert accepts(typed_enum, '"a"') and not accepts(typed_enum, "1")


def test_numbers_integers_booleans_and_null():
    assert all(accepts({"type": "number"}, t) for t in ("0", "-1", "3.25", "1e5", "-0.5E-3", "10"))
    assert all(accepts(INT, t) for t in ("0", "-7", "123"))
    assert not any(accepts(INT, t) for t in ("1.0", "1e3", "-", "00", "+1"))
    assert accepts({"type": "boolean"}, "false") and not accepts({"type": "boolean"}, "null")
    assert accepts({"type": "null"}, "null") and not accepts({"type": "null"}, "0")


def test_type_lists_and_nullable_allow_null():
    for schema in ({"type": ["string", "null"]}, {"type": "string", "nullable": True},
                   {"anyOf": [STRING, {"type": "null"}], "default": None, "title": "T"}):
        assert accepts(schema, '"a"') and accepts(schema, "null") and not accepts(schema, "1"), schema


def test_any_of_between_objects_is_decided_by_later_bytes():
    a = obj({"kind": {"const": "a"}, "x": INT})
    b = obj({"kind": {"const": "b"}, "y": STRING})
    for key in ("anyOf", "oneOf"):
        schema = {key: [a, b]}
        assert accepts(schema, '{"kind": "a", "x": 1}') and accepts(schema, '{"kind": "b", "y": "z"}')
        assert not accepts(schema, '{"kind": "a", "y": "z"}') and not accepts(schema, '{"kind": "c"}')


@pytest.mark.parametrize("defs", ["$defs", "definitions"])
def test_refs_reach_local_definitions_and_may_recurse(defs):
    node = obj({"v": INT, "kids": {"type": "array", "items": {"$ref": f"#/{defs}/node"}}}, required=["v"])
    schema = {defs: {"node": node}, "$ref": f"#/{defs}/node"}
    assert accepts(schema, '{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]}')
    assert not accepts(schema, '{"v": 1, "kids": [{"w": 2}]}')
    assert accepts({"type": "object", "properties": {"next": {"$ref": "#"}}}, '{"next": {"next": {}}}')


def test_whitespace_per_gap_is_one_space_or_newline():
    """Issue 14 item 20: a model may not spend tokens on runs of blank lines, tabs or indentation."""
    assert MAX_WS == 1
    assert accepts(None, '{ "a": [1, 2],\n"b":\n{} }') and accepts(None, '{"a":1}')
    for gap in ("  ", "\n\n", " \n", "\t", "\r\n", "\r"):
        assert not accepts(None, "{" + gap + '"a":1}'), repr(gap)
        assert not accepts(None, '{"a":' + gap + "1}"), repr(gap)
        assert not accepts(None, '{"a":[1,' + gap + "2]}"), repr(gap)
    assert not accepts(None, "{}" + " ")  # nothing after the value, so the engine stops at the closing brace


@pytest.mark.parametrize("schema, inside, outside", [
    ({"type": "integer", "minimum": 18, "maximum": 99}, ["18", "42", "99"], ["17", "100", "-20", "0", "420"]),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1.5}, ["0.5", "1.5", "1", "0.001"],
     ["0", "0.0", "1.51", "2", "-0.5", "1e0"]),
    ({"type": "integer", "minimum": -5, "exclusiveMaximum": -2}, ["-5", "-3"], ["-2", "-6", "0", "3"]),
    ({"type": "number", "minimum": 1, "exclusiveMinimum": True}, ["1.5", "2"], ["1", "0.5"]),  # draft 4 form
    ({"maximum": 10}, ["10", "-3.5"], ["10.5", "11"]),  # bounds alone mean a number
])
def test_numeric_bounds_are_enforced_while_decoding(schema, inside, outside):
    """Issue 14 item 19 (pydantic's Field(ge=, le=, gt=, lt=)): a prefix that cannot end in range is refused."""
    assert all(accepts(schema, t) for t in inside)
    assert not any(accepts(schema, t) for t in outside)
    if schema.get("minimum") == 18:  # "1" could still become 18..19, "2" no number in range that starts 2 and fits
        assert feed(initial(compile_schema(schema)), b"1") and not feed(initial(compile_schema(schema)), b"-")


@settings(max_examples=200, deadline=None)
@given(st.integers(-1000, 1000), st.integers(0, 50), st.integers(-10**6, 10**6))
def test_integer_bounds_agree_with_plain_comparison(lo, width, value):
    schema = {"type": "integer", "minimum": lo, "maximum": lo + width}
    assert accepts(schema, str(value)) == (lo <= value <= lo + width)
    # every prefix of an allowed value is allowed, so greedy decoding can always reach one
    if lo <= value <= lo + width:
        text = str(value)
        assert all(feed(initial(compile_schema(schema)), text[:i].encode()) for i in range(1, len(text)))


def test_strings_numbers_and_nesting_are_bounded():
    assert accepts({"type": "string"}, '"' + "a" * MAX_STRING + '"')
    assert not accepts({"type": "string"}, '"' + "a" * (MAX_STRING + 1) + '"')
    assert accepts(INT, "9" * MAX_INT_DIGITS) and not accepts(INT, "9" * (MAX_INT_DIGITS + 1))
    assert accepts(None, '{"a":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}")
    assert not accepts(None, '{"a":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}")


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "string", "pattern": "^a$"}, "pattern"),
    ({"type": "integer", "multipleOf": 2}, "multipleOf"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "maximum"),
    ({"type": "number", "minimum": "0"}, "minimum"),
    ({"anyOf": [INT], "minimum": 0}, "minimum"),
    (obj({"a": {"type": "array", "uniqueItems": True}}), "uniqueItems"),
    ({"allOf": [STRING, INT]}, "allOf"),
    ({"$ref": "https://example.com/s.json"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "$ref"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "$ref"),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, STRING]}}, "$ref": "#/$defs/a"}, "anyOf"),
    ({"type": "date"}, "type"),
    ({"type": "array", "items": [STRING]}, "items"),
    (obj({"a": STRING}, required=["b"]), "required"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "maxLength"),
    ({"anyOf": []}, "anyOf"),
    ({"enum": []}, "enum"),
    ({"type": "string", "anyOf": [STRING]}, "type"),
    (False, "false"),
])
def test_unsupported_schemas_raise_schema_error_naming_the_keyword(schema, keyword):
    with pytest.raises(SchemaError) as caught:
        compile_schema(schema)
    assert caught.value.keyword == keyword
    assert repr(keyword) in str(caught.value)
    assert isinstance(caught.value, CorralError)


def test_annotations_and_unknown_keywords_are_ignored():
    schema = {"title": "Cat", "description": "d", "type": "object", "x-extra": 1,
              "properties": {"born": {"type": "string", "format": "date-time", "examples": ["2020"]}}}
    assert accepts(schema, '{"born": "yesterday"}')


# ---- properties over many inputs ------------------------------------------------------------------


_text = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",)), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**19), 10**19) | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_text, _json, max_size=5), st.sampled_from([(", ", ": "), (",", ":")]), st.booleans())
def test_any_object_accepts_every_serialized_object(value, separators, ascii_only):
    assert accepts(None, json.dumps(value, separators=separators, ensure_ascii=ascii_only))


_cat = st.fixed_dictionaries(
    {"name": st.text(max_size=40, alphabet=st.characters(exclude_categories=("Cs",))),
     "age": st.integers(-(10**6), 10**6)},
    optional={"tags": st.lists(st.sampled_from(["fluffy", "grumpy"]), max_size=3)},
).map(lambda cat: {k: cat[k] for k in ("name", "age", "tags") if k in cat})  # declared order


@settings(max_examples=100, deadline=None)
@given(_cat, st.booleans())
def test_cat_schema_accepts_every_valid_cat(cat, ascii_only):
    text = json.dumps(cat, ensure_ascii=ascii_only and max(map(ord, cat["name"]), default=0) <= 0xFFFF)
    assert accepts(CAT, text)


@settings(max_examples=300, deadline=None)
@given(_cat, st.integers(0, 10**6), st.sampled_from(["delete", "insert", "replace"]),
       st.sampled_from(list('{}[]",:0123456789 .-eaétn\\') + ["\n"]))
def test_whatever_the_recognizer_accepts_parses_and_validates(cat, where, how, char):
    text = json.dumps(cat, ensure_ascii=False)
    i = where % (len(text) + 1)
    text = {"delete": text[:i] + text[i + 1:], "insert": text[:i] + char + text[i:],
            "replace": text[:i] + char + text[i + 1:]}[how]
    if accepts(CAT, text):
        jsonschema.validate(json.loads(text), CAT)
    if accepts(None, text):
        assert isinstance(json.loads(text), dict)


# ---- token masks ---------------------------------------------------------------------------------


class ByteTokenizer:
    """A small real-shaped vocabulary: every byte, some JSON pieces, split UTF-8, and two special tokens."""

    PIECES = [b'{"', b'":', b'": ', b'",', b'", "', b'"}', b"\n  ", b"  ", b"true", b"null", b"ab", b"name", b'name"',
              b"\xc3", b"\xa9", b"\xc3\xa9", b"\xf0\x9f", b"\x98\x80", b"\xa9\"", b"\\n", b"\\u00", b"12", b"-1", b"]}"]

    def __init__(self):
        self.special_tokens = {"<s>": 0, "</s>": 1}
        self.table = [b"<s>", b"</s>", *(bytes((b,)) for b in range(256)), *self.PIECES]
        self.vocab_size = len(self.table)

    def decode_bytes(self, ids):
        return b"".join(self.table[i] for i in ids)


def brute_force_mask(vocab: Vocabulary, config) -> np.ndarray:
    return np.array([bool(t) and bool(feed(config, t)) for t in vocab.token_bytes])


def test_masks_equal_brute_force_at_every_step_on_a_small_vocabulary():
    tokenizer = ByteTokenizer()
    vocab = vocabulary(tokenizer)
    long_name = "é" * 30 + "ab"
    either = {"anyOf": [obj({"kind": {"const": "a"}, "x": INT}), obj({"kind": {"const": "b"}, "y": STRING})]}
    extra = obj({"name": INT}, required=[], additionalProperties=STRING)
    cases = [(CAT, {"name": long_name, "age": -12, "tags": ["fluffy"]}), (None, {"name": "é😀\n", "x": [True, None]}),
             (either, {"kind": "b", "y": "z"}), (extra, {"name": 1, "nam": "é", "names": "x"})]
    for schema, value in cases:
        c = json_constraint(tokenizer, schema, vocab_size=tokenizer.vocab_size)
        text = json.dumps(value, ensure_ascii=False).encode()
        ids = [tokenizer.table.index(bytes((b,))) for b in text]
        for token in ids:
            mask = c.mask().numpy()
            assert (mask == brute_force_mask(vocab, c.config)).all(), bytes(c.text)
            assert not mask[[0, 1]].any()
            c.advance(token)
        assert c.complete() and not c.mask().any()


@pytest.fixture(scope="module")
def smol_tokenizer():
    from corral.checkpoint.gguf_reader import read_gguf
    from corral.llm import default_model_path
    from corral.tokenizer import load_bpe_from_gguf_metadata

    with read_gguf(default_model_path()) as gguf:
        return load_bpe_from_gguf_metadata(gguf.metadata)


CAT_TEXT = '{"name": "Whiskers von Übermaß 😺", "age": 3, "tags": ["fluffy", "grumpy"]}'


def test_smollm2_masks_equal_brute_force_inside_strings_and_between_tokens(smol_tokenizer):
    vocab = vocabulary(smol_tokenizer)
    c = json_constraint(smol_tokenizer, CAT, vocab_size=vocab.size)
    ids = smol_tokenizer.encode(CAT_TEXT)
    checked = 0
    for i, token in enumerate(ids):
        # start, in a key, value start, in a string, half a character, 3/4 of one, in a number, in an enum, end
        if i in (0, 1, 3, 4, 9, 14, 21, 26, 34):
            assert (c.mask().numpy() == brute_force_mask(vocab, c.config)).all(), bytes(c.text)
            checked += 1
        c.advance(token)
    assert checked == 9 and c.complete()
    assert json.loads(bytes(c.text)) == json.loads(CAT_TEXT)


def test_tokens_holding_part_of_a_character_are_allowed_inside_strings(smol_tokenizer):
    vocab = vocabulary(smol_tokenizer)
    lead = vocab.token_bytes.index(b"\xf0")  # first byte of a 4-byte character
    c = json_constraint(smol_tokenizer, {"type": "string"}, vocab_size=vocab.size)
    c.advance(vocab.token_bytes.index(b'"'))
    assert c.mask()[lead]
    c.advance(lead)
    mask = c.mask()
    allowed = [vocab.token_bytes[i] for i in np.flatnonzero(mask.numpy())]
    assert allowed and all(0x90 <= t[0] <= 0xBF for t in allowed)  # only what continues an F0 character
    assert not mask[vocab.token_bytes.index(b'"')]


def test_special_tokens_are_never_allowed(smol_tokenizer):
    special = list(smol_tokenizer.special_tokens.values())
    c = json_constraint(smol_tokenizer, None, vocab_size=smol_tokenizer.vocab_size)
    for token in smol_tokenizer.encode('{"a": "b"}'):
        assert not c.mask()[special].any()
        c.advance(token)
    with pytest.raises(ValueError):
        json_constraint(smol_tokenizer, None, vocab_size=smol_tokenizer.vocab_size).advance(special[0])


def test_mask_has_the_model_vocab_size(smol_tokenizer):
    n = smol_tokenizer.vocab_size
    wide = json_constraint(smol_tokenizer, None, vocab_size=n + 64).mask()
    narrow = json_constraint(smol_tokenizer, None, vocab_size=n - 64).mask()
    assert wide.shape == (n + 64,) and wide.dtype == torch.bool and not wide[n:].any()
    assert narrow.shape == (n - 64,) and torch.equal(narrow, wide[: n - 64])


def test_a_disallowed_token_is_refused(smol_tokenizer):
    c = json_constraint(smol_tokenizer, CAT, vocab_size=smol_tokenizer.vocab_size)
    bad = smol_tokenizer.encode("[")[0]
    assert not c.mask()[bad]
    with pytest.raises(ValueError, match="does not continue"):
        c.advance(bad)


def test_vocabulary_builds_fast_and_masks_take_milliseconds(smol_tokenizer):
    start = time.perf_counter()
    vocab = Vocabulary(smol_tokenizer)
    build_s = time.perf_counter() - start
    c = JsonConstraint(Grammar(compile_schema(CAT), vocab), vocab.size)  # nothing cached yet
    times = []
    for token in smol_tokenizer.encode(CAT_TEXT):
        start = time.perf_counter()
        assert c.mask()[token]
        times.append(time.perf_counter() - start)
        c.advance(token)
    # Targets 3 s and 15 ms; measured about 0.4 s and 0.3 ms (docs/constrained.md). The slack is for a busy CI box.
    assert build_s < 6.0, build_s
    assert np.mean(times) < 0.015, np.mean(times)


def test_same_schema_shares_one_compiled_grammar(smol_tokenizer):
    a = json_constraint(smol_tokenizer, CAT, vocab_size=10)
    b = json_constraint(smol_tokenizer, json.loads(json.dumps(CAT)), vocab_size=10)
    assert a.grammar is b.grammar and a.config == b.config
    with pytest.raises(SchemaError):
        json_constraint(smol_tokenizer, {"type": "string", "pattern": "a"}, vocab_size=10)


# ---- the real model, greedy -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    import corral

    return corral.load()


def greedy_json(llm, schema, max_tokens: int = 80) -> str:
    """Greedy decoding under the constraint, with the reference KV-cache path; returns the text."""
    from corral.engine.generate import decode_one_token, prefill
    from corral.engine.kv_cache import KVCache

    messages = [{"role": "user", "content": "Give me a JSON object describing a cat with name and age"}]
    prompt = llm.chat_format.encode_dialog(messages, add_generation_prompt=True)
    c = json_constraint(llm.tokenizer, schema, vocab_size=llm.config.vocab_size)
    cache = KVCache(llm.config, 1, len(prompt) + max_tokens, dtype=torch.float32)
    logits = prefill(llm.model, torch.tensor([prompt]), cache)
    for pos in range(len(prompt), len(prompt) + max_tokens):
        token = int(logits.masked_fill(~c.mask(), float("-inf")).argmax())
        c.advance(token)
        if c.complete():
            break
        logits = decode_one_token(llm.model, token, pos, cache)
    assert c.complete(), bytes(c.text)
    return bytes(c.text).decode()


@pytest.mark.slow
def test_smollm2_greedy_output_follows_the_schema(smollm2):
    schema = obj({"name": {"type": "string", "maxLength": 30}, "age": INT}, additionalProperties=False)
    value = json.loads(greedy_json(smollm2, schema))
    jsonschema.validate(value, schema)
    assert list(value) == ["name", "age"]


@pytest.mark.slow
def test_smollm2_greedy_output_is_a_json_object_in_json_mode(smollm2):
    assert isinstance(json.loads(greedy_json(smollm2, None)), dict)
