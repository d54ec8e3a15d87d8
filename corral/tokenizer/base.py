"""What every Corral tokenizer derives from its own ``decode_bytes`` and ``special_tokens``."""

from __future__ import annotations

from collections.abc import Sequence

from corral.errors import TokenizerError


class SpecialTokensMixin:
    special_tokens: dict[str, int]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:  # each tokenizer supplies its own
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 (a character cut mid-way) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int:
        """Id of a special token's text, e.g. ``<|eot_id|>``."""
        try:
            return self.special_tokens[text]
        except KeyError:
            raise TokenizerError(f"unknown special token {text!r}") from None
