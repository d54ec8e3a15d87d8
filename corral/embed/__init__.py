"""Sentence embeddings: a small BERT encoder (all-MiniLM-L6-v2) and mean-pooled LLM hidden states.

Both return L2-normalised float32 rows, so a dot product is the cosine similarity. Inputs
longer than the model's limit are cut only when the caller says truncate=True; otherwise
EmbedInputError names the input and its token count (the server maps it to HTTP 400).
"""

from corral.errors import CorralError


class EmbedInputError(CorralError, ValueError):
    """One input cannot be embedded: too many tokens for the model (and truncate=False), or none at all."""

    def __init__(self, message: str, *, index: int, tokens: int, limit: int | None = None):
        self.index = index
        self.tokens = tokens
        self.limit = limit
        super().__init__(message)

    @classmethod
    def too_long(cls, index: int, tokens: int, limit: int, model: str) -> "EmbedInputError":
        return cls(
            f"input {index} has {tokens} tokens; {model} embeds at most {limit} (pass truncate=True to cut it)",
            index=index,
            tokens=tokens,
            limit=limit,
        )


# The submodules import EmbedInputError from here, so it is defined before them.
from corral.embed.llm_embed import embed_with_llm  # noqa: E402
from corral.embed.minilm import SentenceEncoder  # noqa: E402

__all__ = ["EmbedInputError", "SentenceEncoder", "embed_with_llm"]
