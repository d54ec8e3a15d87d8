"""Embeddings from a generative model, as Ollama's /api/embed gives for any model.

The vector is the mean over the prompt's tokens of the final-norm hidden states (the input of
the output projection, ``Transformer.hidden``), scaled to unit length. The model is causal, so token t
has seen only tokens 0..t; the mean still carries the whole text. The engine's KV cache is not touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from corral.embed import EmbedInputError
from corral.model.llama import Transformer


class EmbedCancelled(Exception):
    """The caller's stop() said to give up (the client left); raised between layers."""


class StopCheck:
    """A pass-through "cache" for one whole-prompt forward: keeps nothing, returns the keys and values it is
    given (so attention is exactly the uncached causal one), and raises EmbedCancelled when stop() says so.
    Each layer's attention calls update, so an 8k-token input stops within one layer, not one forward."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def update(self, layer_id: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        if self.stop():
            raise EmbedCancelled
        return k, v


def token_rows(llm: Any, texts: list[str], *, truncate: bool = True) -> list[list[int]]:
    """Texts -> token id rows, each tokenized as a plain prompt (BOS when the model adds one).

    Over the context (llm.engine.max_seq_len): the head is kept if truncate, else EmbedInputError. A text
    with no tokens at all (the empty string, for a model without BOS) is an EmbedInputError too.
    """
    limit = llm.engine.max_seq_len
    name = llm.name or "this model"
    ids = [llm.tokenizer.encode(text, bos=llm.add_bos) for text in texts]
    for i, row in enumerate(ids):
        if not row:
            raise EmbedInputError(f"input {i} has no tokens to embed (empty text)", index=i, tokens=0)
        if len(row) > limit:
            if not truncate:
                raise EmbedInputError.too_long(i, len(row), limit, name)
            ids[i] = row[:limit]
    return ids


def embed_with_llm(llm: Any, texts: list[str], *, truncate: bool = True, batch_size: int = 8,
                   stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Texts -> (N, dim) float32 unit rows from a corral.LLM (token_rows, then embed_rows)."""
    return embed_rows(llm.model, token_rows(llm, texts, truncate=truncate), batch_size=batch_size, stop=stop)


def embed_rows(model: Transformer, ids: list[list[int]], *, batch_size: int = 8,
               stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Token id rows -> (N, dim) float32 unit rows; stop() (e.g. "the client left") is checked at every
    layer of every batch, and True raises EmbedCancelled."""
    out = torch.empty(len(ids), model.config.dim, dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: batches pad little
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = pooled_batch(model, [ids[i] for i in chunk], stop)
    return out


def pooled_batch(model: Transformer, rows: list[list[int]], stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Non-empty id lists -> (B, dim) unit vectors: masked mean of the final hidden states."""
    device = model.norm.weight.device
    T = max(len(r) for r in rows)
    # (B, T): pads follow every real token, so causal attention keeps them out of the real positions
    tokens = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rows], device=device)[..., None]  # (B, T, 1)
    # Positions start at 0 for every row and attention is causal (no mask, start_pos 0; the StopCheck "cache"
    # passes keys and values through), so the padding after a row's last real token cannot change that row's
    # real positions.
    cache = StopCheck(stop) if stop is not None else None
    h = model.hidden(tokens, cache=cache).float()  # (B, T, dim) final-norm hidden states
    pooled = (h * mask).sum(1) / mask.sum(1)  # (B, dim); every row has at least one token
    return F.normalize(pooled, p=2, dim=-1).cpu()
