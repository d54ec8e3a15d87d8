"""Byte-level BPE (GPT-2 style) built from GGUF metadata or a Hugging Face ``tokenizer.json``.

The HF ``tokenizers`` library runs the pre-tokenizer regexes and the merges; Corral keeps the special
tokens out of it and matches their text itself, so special-token text in user content stays plain text.
Decoding maps ids to bytes through our own table (byte-level alphabet inverted; control and
user-defined tokens are their literal UTF-8 text), which gives ``decode_bytes`` for streaming.
"""

from __future__ import annotations

import json
import numbers
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from corral.errors import TokenizerError
from corral.tokenizer.base import SpecialTokensMixin
from corral.tokenizer.llama3 import SPLIT_PATTERN, special_token_regex, split_on_special

# GGUF tokenizer.ggml.token_type values (llama.cpp llama_token_type).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 2, 3, 4
TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 5, 6
_SPECIAL_TYPES = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (SPLIT_PATTERN,)
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2_SPLIT)  # every digit its own piece, then GPT-2's split
_GPT2 = (_GPT2_SPLIT,)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")

# What each tokenizer.ggml.pre name means in llama.cpp (llama-vocab.cpp): regexes applied in turn,
# each splitting the pieces of the one before (text between matches stays a piece of its own).
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3,
    "pixtral": _LLAMA3,
    "midm-2.0": _LLAMA3,
    "lfm2": _LLAMA3,
    "jina-v5-nano": _LLAMA3,
    "smaug-bpe": _LLAMA3,  # llama.cpp's label for some Llama 3 files (e.g. Smaug-Llama-3-70B)
    "dbrx": _LLAMA3,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "exaone": _DIGITS_THEN_GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "default": _DEFAULT,
}
# llama.cpp (like tiktoken) takes a whole pre-token that is in the vocabulary as is, skipping merges, for the
# names it maps to LLAMA_VOCAB_PRE_TYPE_LLAMA3; smaug-bpe and dbrx use the same regex but run the merges.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                  "jina-v5-nano"}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
    for the code points 256, 257, ... in byte order, so every token is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


def byte_level_to_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for; a character outside the alphabet counts as its UTF-8."""
    out = bytearray()
    for ch in token:
        b = _UNICODE_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8", errors="surrogatepass")
        else:
            out.append(b)
    return bytes(out)


class BPETokenizer(SpecialTokensMixin):
    """Byte-level BPE with the Corral tokenizer interface.

    ``core`` is a ``tokenizers.Tokenizer`` with the BPE model and pre-tokenizer and no added tokens;
    ``token_bytes[i]`` is what id ``i`` decodes to.
    """

    def __init__(
        self,
        core: Tokenizer,
        token_bytes: list[bytes],
        special_tokens: dict[str, int],
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = False,
    ):
        self._core = core
        self._token_bytes = token_bytes
        self.vocab_size = len(token_bytes)
        self.special_tokens = dict(special_tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        """Whether the model's files ask for BOS at the start of a plain prompt (GGUF add_bos_token)."""
        self._special_re = special_token_regex(self.special_tokens)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, got {type(text).__name__}")
        ids: list[int] = []
        if bos:
            ids.append(self._require(self.bos_id, "BOS"))
        if allow_special:
            for piece, is_special in split_on_special(text, self._special_re):
                ids.extend([self.special_tokens[piece]] if is_special else self._encode_plain(piece))
        else:
            ids.extend(self._encode_plain(text))
        if eos:
            ids.append(self._require(self.eos_id, "EOS"))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        # Lone surrogates cannot be UTF-8 encoded; like tiktoken, encode them as U+FFFD.
        text = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
        return self._core.encode(text, add_special_tokens=False).ids

    @staticmethod
    def _require(token: int | None, what: str) -> int:
        if token is None:
            raise TokenizerError(f"this tokenizer has no {what} token")
        return token

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        table = self._token_bytes
        try:
            return b"".join(table[_check_id(i, len(table))] for i in ids)
        except TypeError as e:
            raise TokenizerError(f"token ids must be integers: {e}") from None



def _check_id(i: Any, n: int) -> int:
    i = operator.index(i)
    if not 0 <= i < n:
        raise TokenizerError(f"token id {i} is outside the vocabulary [0, {n})")
    return i


def build_core(
    vocab: dict[str, int], merges: list[tuple[str, str]], splits: Sequence[str], *, ignore_merges: bool
) -> Tokenizer:
    """A tokenizers.Tokenizer: regex splits in order, bytes -> byte-level characters, then BPE."""
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers raises plain Exception for merges that name unknown tokens
        raise TokenizerError(f"vocabulary and merges do not fit together: {e}", field="merges") from e
    core = Tokenizer(model)
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    core.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return core


# ---- GGUF metadata -------------------------------------------------------------------------------


def _scalar(meta: dict[str, Any], key: str) -> Any:
    value = meta.get(key)
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple)) else value


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:  # GGUF readers may hand back numpy integers; bool is not a token id or type
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, kind)


def _as_list(meta: dict[str, Any], key: str, kind: type, *, required: bool = True) -> list | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise TokenizerError("missing key", field=key)
        return None
    if hasattr(value, "tolist"):  # numpy arrays from a GGUF reader
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TokenizerError(f"expected an array of {kind.__name__}, got {type(value).__name__}", field=key)
    for i, v in enumerate(value):
        if not _is_kind(v, kind):
            raise TokenizerError(f"element {i} is {type(v).__name__}, expected {kind.__name__}", field=key)
    return list(value)


def _as_token_id(meta: dict[str, Any], key: str, n_vocab: int) -> int | None:
    value = _scalar(meta, key)
    if value is None:
        return None
    if not _is_kind(value, int):
        raise TokenizerError(f"expected an integer token id, got {type(value).__name__}", field=key)
    if not 0 <= int(value) < n_vocab:
        raise TokenizerError(f"token id {int(value)} is outside the vocabulary [0, {n_vocab})", field=key)
    return int(value)


def _as_str(meta: dict[str, Any], key: str, default: str | None = None) -> str:
    value = meta.get(key, default)
    if value is None:
        raise TokenizerError("missing key", field=key)
    if not isinstance(value, str):
        raise TokenizerError(f"expected a string, got {type(value).__name__}", field=key)
    return value


def _split_merges(merges: list[str], field: str) -> list[tuple[str, str]]:
    pairs = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)  # a merge is "left right"; left is never empty
        if cut < 0 or cut == len(m) - 1:
            raise TokenizerError(f"merge {i} is {m[:40]!r}, expected 'left right'", field=field)
        pairs.append((m[:cut], m[cut + 1 :]))
    return pairs


def load_bpe_from_gguf_metadata(metadata: dict[str, Any]) -> BPETokenizer:
    """Build the tokenizer that a GGUF file's ``tokenizer.ggml.*`` keys describe (model ``gpt2`` only)."""
    model = _as_str(metadata, "tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(
            f"unsupported tokenizer model {model!r}; only 'gpt2' (byte-level BPE) is supported",
            field="tokenizer.ggml.model",
        )
    pre = _as_str(metadata, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise TokenizerError(
            f"unsupported pre-tokenizer {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}",
            field="tokenizer.ggml.pre",
        )
    tokens = _as_list(metadata, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise TokenizerError("the vocabulary is empty", field="tokenizer.ggml.tokens")
    merges = _split_merges(_as_list(metadata, "tokenizer.ggml.merges", str), "tokenizer.ggml.merges")
    types = _as_list(metadata, "tokenizer.ggml.token_type", int, required=False) or [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{len(types)} token types for {len(tokens)} tokens", field="tokenizer.ggml.token_type")
    add_bos = _scalar(metadata, "tokenizer.ggml.add_bos_token")
    add_bos = False if add_bos is None else add_bos
    if not isinstance(add_bos, (bool, numbers.Integral)):
        raise TokenizerError(f"expected a bool, got {type(add_bos).__name__}", field="tokenizer.ggml.add_bos_token")

    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in _SPECIAL_TYPES and t}
    # The BPE model sees only ordinary tokens; special ones are matched (or not) by BPETokenizer.
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in _SPECIAL_TYPES}
    token_bytes = [
        t.encode("utf-8") if ty in _SPECIAL_TYPES else byte_level_to_bytes(t) for t, ty in zip(tokens, types)
    ]
    core = build_core(vocab, merges, PRE_TOKENIZER_SPLITS[pre], ignore_merges=pre in _IGNORE_MERGES)
    return BPETokenizer(
        core,
        token_bytes,
        special,
        bos_id=_as_token_id(metadata, "tokenizer.ggml.bos_token_id", len(tokens)),
        eos_id=_as_token_id(metadata, "tokenizer.ggml.eos_token_id", len(tokens)),
        add_bos=bool(add_bos),
    )


# ---- Hugging Face tokenizer.json -----------------------------------------------------------------

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")


def _read_tokenizer_json(source: str | os.PathLike | dict) -> dict:
    if isinstance(source, dict):
        return source
    try:
        data = json.loads(Path(source).read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer.json: {e.strerror}", path=str(source)) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"tokenizer.json is not UTF-8 JSON: {e}", path=str(source)) from e
    if not isinstance(data, dict):
        raise TokenizerError("tokenizer.json must hold a JSON object", path=str(source))
    return data


def _hf_added_tokens(data: dict) -> dict[str, int]:
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise TokenizerError("expected a list", field="added_tokens")
    out = {}
    for i, tok in enumerate(added):
        if not (isinstance(tok, dict) and isinstance(tok.get("content"), str) and _is_kind(tok.get("id"), int)):
            raise TokenizerError(f"entry {i} needs a string 'content' and an integer 'id'", field="added_tokens")
        if tok["content"] and tok["id"] >= 0:
            out[tok["content"]] = int(tok["id"])
    return out


def _is_byte_level(data: dict) -> bool:
    def has_byte_level(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(n) for n in node.get("pretokenizers") or node.get("decoders") or [])

    return has_byte_level(data.get("pre_tokenizer")) or has_byte_level(data.get("decoder"))


def _pick_special(special: dict[str, int], wanted: str | None, names: Sequence[str], what: str) -> int | None:
    if wanted is not None:
        if wanted not in special:
            raise TokenizerError(f"{what} token {wanted!r} is not an added token of this tokenizer.json")
        return special[wanted]
    return next((special[n] for n in names if n in special), None)


def load_bpe_from_hf_json(
    path: str | os.PathLike | dict, *, bos_token: str | None = None, eos_token: str | None = None
) -> BPETokenizer:
    """Build a byte-level BPE tokenizer from an HF ``tokenizer.json`` (a path, or its parsed JSON).

    tokenizer.json does not say which token is BOS/EOS (tokenizer_config.json does): pass their texts,
    or the usual names (<|begin_of_text|>/<s>, <|end_of_text|>/</s>/<|endoftext|>) are looked up.
    """
    data = _read_tokenizer_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise TokenizerError(f"unsupported tokenizer model {kind!r}; only BPE is supported", field="model.type")
    if not _is_byte_level(data):
        raise TokenizerError(
            "only byte-level BPE is supported (no ByteLevel pre-tokenizer or decoder)", field="pre_tokenizer"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and _is_kind(v, int) for k, v in vocab.items()):
        raise TokenizerError("expected an object of token -> id", field="model.vocab")
    special = _hf_added_tokens(data)
    n = max([*vocab.values(), *special.values()], default=-1) + 1
    token_bytes = [b""] * n  # ids that neither the vocab nor added_tokens name decode to nothing
    for tok, i in vocab.items():
        if i >= 0:
            token_bytes[i] = byte_level_to_bytes(tok)
    for tok, i in special.items():
        token_bytes[i] = tok.encode("utf-8")
    # HF parses the model, normalizer and pre-tokenizer; added tokens and decoding stay with us (module doc).
    stripped = {**data, "added_tokens": [], "post_processor": None, "decoder": None}
    try:
        core = Tokenizer.from_str(json.dumps(stripped))
    except Exception as e:  # tokenizers raises plain Exception for any bad field
        raise TokenizerError(f"tokenizer.json is not a valid tokenizer: {e}", field="model") from e
    return BPETokenizer(
        core,
        token_bytes,
        special,
        bos_id=_pick_special(special, bos_token, _BOS_NAMES, "BOS"),
        eos_id=_pick_special(special, eos_token, _EOS_NAMES, "EOS"),
    )
