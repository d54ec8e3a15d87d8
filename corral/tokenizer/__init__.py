"""Tokenizers: Meta's Llama 3 tiktoken BPE and byte-level BPE from GGUF metadata or HF tokenizer.json.

Every tokenizer has the ``Tokenizer`` protocol's attributes and methods. Special-token text inside
ordinary input is encoded as plain text unless ``allow_special=True`` (template text only, never user
content), so a user cannot forge a system turn.
"""

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from corral.tokenizer.bpe import BPETokenizer, load_bpe_from_gguf_metadata, load_bpe_from_hf_json
from corral.tokenizer.llama3 import Llama3Tokenizer, load_llama3_tokenizer


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None  # end of text
    special_tokens: dict[str, int]  # text of each special/control token -> id

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Ids of ``text``; special-token text becomes its id only with ``allow_special``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD, special ids their text."""
        ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of ``ids``, for streaming detokenization."""
        ...

    def token_id(self, text: str) -> int:
        """Id of a special token's text; TokenizerError if there is none."""
        ...


__all__ = [
    "BPETokenizer",
    "Llama3Tokenizer",
    "Tokenizer",
    "load_bpe_from_gguf_metadata",
    "load_bpe_from_hf_json",
    "load_llama3_tokenizer",
]
