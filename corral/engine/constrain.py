"""Constrained decoding: hold a model to JSON (any object, or what a JSON Schema allows).

    c = json_constraint(tokenizer, schema, vocab_size=model_vocab)   # SchemaError if unsupported
    while not c.complete():
        logits[~c.mask()] = -inf; token = sample(logits); c.advance(token)

The grammar is a byte-level recognizer (json_grammar.py over json_schema.py). A token is allowed
when the recognizer can read all of its bytes from the current state, so the allowed set is found
by walking a byte trie of the vocabulary with the recognizer and pruning at the first byte it
refuses. Inside a free string almost every token is allowed, so that case skips the walk: tokens
without a quote, backslash or control byte are allowed from a precomputed mask (one per UTF-8
state, trimmed by the room left under maxLength), and only the ~200 tokens that hold a quote or a
backslash are walked. Masks are cached per grammar by recognizer state (string lengths folded
away where they cannot matter), so a request mostly pays for a dictionary lookup per token.
docs/constrained.md has the supported schema subset, the bounds and measured speeds.
"""

from __future__ import annotations

import bisect
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import torch

from corral.engine.json_grammar import STR, U8_DUE, U8_LEAD, U8_NEXT, U8_RANGE, can_end, feed, initial, step
from corral.engine.json_schema import Node, SchemaError, compile_schema

__all__ = ["Constraint", "JsonConstraint", "SchemaError", "Vocabulary", "json_constraint", "vocabulary"]

MASKS_PER_GRAMMAR = 1024
"""Cached masks per schema, each at most vocab/8 bytes (6 KB for a 49k vocabulary, 16 KB for 128k)."""
GRAMMARS_PER_VOCAB = 8
"""Compiled schemas kept per tokenizer, with their masks, for requests that repeat a schema."""

_CONT = bytes(range(0x80, 0xC0))
_NOT_PLAIN = bytes(range(0x20)) + b'"\\'


class Constraint(Protocol):
    def mask(self) -> torch.Tensor | None:
        """bool (vocab_size,) of the tokens allowed next (True = allowed); None = no limit."""

    def advance(self, token: int) -> None:
        """Record the chosen token."""

    def complete(self) -> bool:
        """The text so far is a whole valid value."""


class _Trie:
    """A byte trie over the sorted token bytes, each node expanded on its first visit: the walks of
    structured states touch only a few hundred nodes, so building the whole trie (seconds for
    128k tokens) would be wasted. A node is [ids ending here, children {byte: node} or None until
    expanded, lo, hi, depth]: keys[lo:hi] are the tokens below it, sharing their first depth bytes."""

    def __init__(self, tokens: list[bytes], ids: list[int]):
        self.ids = sorted(ids, key=tokens.__getitem__)
        self.keys = [tokens[i] for i in self.ids]
        self.root = self.expand([(), None, 0, len(self.keys), 0])

    def expand(self, node: list) -> dict:
        keys, (lo, hi, depth) = self.keys, node[2:]
        children = {}
        i = lo
        while i < hi:
            b = keys[i][depth]
            j = hi if b == 255 else bisect.bisect_left(keys, keys[i][:depth] + bytes((b + 1,)), i, hi)
            k = i
            while k < j and len(keys[k]) == depth + 1:  # shorter keys sort first: these end at the child
                k += 1
            children[b] = [tuple(self.ids[i:k]), None if k < j else {}, k, j, depth + 1]
            i = j
        node[1] = children
        return children


def _utf8_whole_or_partial(data: bytes) -> bool:
    """Whether data (starting at a character boundary) is valid UTF-8, allowing a cut-off last character."""
    if data.isascii():
        return True
    state = 0
    for b in data:
        if state:
            lo, hi = U8_RANGE[state]
            if not lo <= b <= hi:
                return False
            state = U8_NEXT[state]
        elif b >= 0x80:
            state = U8_LEAD[b]
            if not state:
                return False
    return True


class Vocabulary:
    """A tokenizer's tokens as bytes, in the shapes mask computation needs; built once per tokenizer."""

    def __init__(self, tokenizer: Any):
        n = tokenizer.vocab_size
        special = set(getattr(tokenizer, "special_tokens", {}).values())
        # Special tokens (and stop ids, which the engine handles) never spell JSON: they get no bytes.
        self.token_bytes = [b"" if i in special else tokenizer.decode_bytes([i]) for i in range(n)]
        tokens = self.token_bytes
        self.size = n
        self.max_bytes = max(map(len, tokens))
        self.trie = _Trie(tokens, [i for i in range(n) if tokens[i]])
        self.quote_trie = _Trie(tokens, [i for i in range(n) if b'"' in tokens[i] or b"\\" in tokens[i]])
        self.string_masks, self.nchars = self._string_tables(tokens)
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def _string_tables(tokens: list[bytes]) -> tuple[list[np.ndarray], np.ndarray]:
        """For each UTF-8 state u8 (json_grammar), the tokens that may follow inside a string without
        ending it: no quote, backslash or control byte, and UTF-8 that continues the pending character."""
        n = len(tokens)
        length = np.fromiter(map(len, tokens), np.int32, n)
        nchars = np.fromiter((len(t.translate(None, _CONT)) for t in tokens), np.int32, n)
        lead = np.fromiter((len(t) - len(t.lstrip(_CONT)) for t in tokens), np.int32, n)
        first = np.fromiter((t[0] if t else 0 for t in tokens), np.int32, n)
        plain = np.fromiter((bool(t) and len(t.translate(None, _NOT_PLAIN)) == len(t) for t in tokens), bool, n)
        rest_ok = np.fromiter((_utf8_whole_or_partial(t.lstrip(_CONT)) for t in tokens), bool, n)
        masks = [plain & (lead == 0) & rest_ok]
        for u8 in range(1, len(U8_DUE)):
            (lo, hi), due = U8_RANGE[u8], U8_DUE[u8]
            fits = ((lead == due) & rest_ok) | ((lead == length) & (length < due))
            masks.append(plain & (first >= lo) & (first <= hi) & fits)
        return masks, nchars

    def grammar(self, schema: dict | bool | None) -> Grammar:
        try:
            key = json.dumps(schema)  # property order matters (declared order), so keys are not sorted
        except (TypeError, ValueError) as e:
            raise SchemaError(f"the schema is not JSON: {e}", keyword="type") from None
        with self.lock:
            found = self.grammars.get(key)
            if found is not None:
                self.grammars.move_to_end(key)
                return found
        built = Grammar(compile_schema(schema), self)
        with self.lock:
            self.grammars[key] = built
            if len(self.grammars) > GRAMMARS_PER_VOCAB:
                self.grammars.popitem(last=False)
        return built


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer: Any) -> Vocabulary:
    """The Vocabulary of a tokenizer, built on first use (about a second for 50k tokens) and kept with it."""
    with _vocabularies_lock:  # one build per tokenizer even when two requests race
        vocab = _vocabularies.get(tokenizer)
        if vocab is None:
            vocab = _vocabularies[tokenizer] = Vocabulary(tokenizer)
        return vocab


def _walk(trie: _Trie, children: dict, config: list, out: list) -> None:
    """Append to out the ids of every token under children that config can read whole."""
    for b, node in children.items():
        nxt: list = []
        for stack in config:
            step(stack, b, nxt)
        if nxt:
            if node[0]:
                out.extend(node[0])
            kids = node[1]
            if kids is None:
                kids = trie.expand(node)
            if kids:
                _walk(trie, kids, list(dict.fromkeys(nxt)) if len(nxt) > 1 else nxt, out)


class Grammar:
    """A compiled schema over one vocabulary, with the masks of the states seen so far."""

    def __init__(self, root: Node, vocab: Vocabulary):
        self.root, self.vocab = root, vocab
        self._masks: OrderedDict[Any, np.ndarray] = OrderedDict()  # state key -> allowed ids (int32) or packed bits
        self._lock = threading.Lock()

    def allowed(self, stack: tuple) -> np.ndarray:
        """bool (vocab.size,) of the tokens stack can read whole."""
        key = self._key(stack)
        with self._lock:
            stored = self._masks.get(key)
            if stored is not None:
                self._masks.move_to_end(key)
        if stored is None:
            allowed = self._compute(stack)
            ids = np.flatnonzero(allowed).astype(np.int32)
            # Keep whichever is smaller: the ids (structure: a few hundred) or the bits (inside strings: most).
            stored = ids if ids.nbytes < self.vocab.size // 8 else np.packbits(allowed)
            with self._lock:
                self._masks[key] = stored
                if len(self._masks) > MASKS_PER_GRAMMAR:
                    self._masks.popitem(last=False)
            return allowed
        if stored.dtype == np.uint8:
            return np.unpackbits(stored, count=self.vocab.size).view(bool)
        allowed = np.zeros(self.vocab.size, bool)
        allowed[stored] = True
        return allowed

    def _key(self, stack: tuple) -> tuple:
        """The stack with a string's length folded to -1 where no token could reach either bound."""
        f = stack[0]
        if f[0] == STR and f[1].min <= f[2] <= f[1].max - self.vocab.max_bytes:
            return ((STR, f[1], -1, *f[3:]), stack[1])
        return stack

    def _compute(self, stack: tuple) -> np.ndarray:
        vocab = self.vocab
        ids: list[int] = []
        f = stack[0]
        if f[0] == STR and f[4] == 0:  # inside a string, not in an escape: the fast path
            allowed = vocab.string_masks[f[3]].copy()
            room = f[1].max - f[2]
            if room < vocab.max_bytes:
                allowed &= vocab.nchars <= room
            _walk(vocab.quote_trie, vocab.quote_trie.root, [stack], ids)
        else:
            allowed = np.zeros(vocab.size, bool)
            _walk(vocab.trie, vocab.trie.root, [stack], ids)
        allowed[ids] = True
        return allowed


class JsonConstraint:
    """One request's progress through a Grammar (see the Constraint protocol)."""

    def __init__(self, grammar: Grammar, vocab_size: int):
        self.grammar = grammar
        self.vocab_size = vocab_size
        self.config = initial(grammar.root)
        self.text = bytearray()
        """The bytes accepted so far."""

    def mask(self) -> torch.Tensor:
        """A fresh bool (vocab_size,) tensor; all False once the value is finished."""
        parts = [self.grammar.allowed(s) for s in self.config if s is not None]
        n = self.grammar.vocab.size
        if len(parts) == 1 and n == self.vocab_size:  # the usual case: one live stack, no padded vocabulary
            return torch.from_numpy(parts[0])
        allowed = np.zeros(max(n, self.vocab_size), bool)
        for part in parts:
            allowed[:n] |= part
        return torch.from_numpy(allowed[: self.vocab_size])

    def advance(self, token: int) -> None:
        vocab = self.grammar.vocab
        data = vocab.token_bytes[token] if 0 <= token < vocab.size else b""
        config = feed(self.config, data) if data else ()
        if not config:  # the mask forbids this token: the caller did not apply it
            raise ValueError(f"token {token} ({data!r}) does not continue the JSON after {bytes(self.text[-40:])!r}")
        self.config = config
        self.text += data

    def complete(self) -> bool:
        return can_end(self.config)


def json_constraint(tokenizer: Any, schema: dict | None, *, vocab_size: int) -> Constraint:
    """A Constraint for JSON: schema None = any JSON object (OpenAI json_object, Ollama format "json"),
    else a JSON Schema (SchemaError, a CorralError, if it uses what cannot be enforced)."""
    return JsonConstraint(vocabulary(tokenizer).grammar(schema), vocab_size)
