"""Speculative decoding (Leviathan et al. 2023, arXiv 2211.17192), greedy form.

A drafter proposes k tokens cheaply; the target model scores all of them in one forward and
keeps the longest run it agrees with, plus its own next token. Under greedy decoding the
output is exactly what the target alone would produce; only the number of forwards changes.
Two drafters: a small draft model, and prompt lookup (Saxena 2023), which copies the tokens that
followed the last occurrence of the current n-gram in the context (no second model at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from corral.engine.kv_cache import SlotCache, cache_dtype
from corral.model.llama import Transformer


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k guesses of the tokens after context (may be fewer, or none)."""
        ...

    def observe(self, context: Sequence[int], accepted: int, proposed: int) -> None:
        """How many of the last proposal the target kept (for statistics)."""
        ...


def accept_greedy(draft: Sequence[int], target: Sequence[int]) -> list[int]:
    """target[i] is the target's argmax after the context plus draft[:i] (len(draft) + 1 of them).

    Keep drafts while they equal the target's choice; the first disagreement is replaced by the
    target's token; if every draft holds, the target's token after the last one comes free.
    """
    out = []
    for guess, want in zip(draft, target):
        out.append(want)
        if guess != want:
            return out
    out.append(target[len(draft)])
    return out


class DrafterStats:
    def __init__(self) -> None:
        self.proposed = self.accepted = 0

    def observe(self, context: Sequence[int], accepted: int, proposed: int) -> None:
        self.accepted += accepted
        self.proposed += proposed

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class PromptLookup(DrafterStats):
    """Find the latest earlier occurrence of the context's last n tokens (n from max_ngram down to 1)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        super().__init__()
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        ctx = list(context)
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):  # latest match first, never the tail itself
                if ctx[start : start + n] == tail:
                    follow = ctx[start + n : start + n + k]
                    if follow:
                        return follow
        return []


class DraftModel(DrafterStats):
    """A smaller (or quantized) model with the same tokenizer; keeps its own cache across steps."""

    def __init__(self, model: Transformer, max_seq_len: int | None = None):
        super().__init__()
        self.model = model
        weight = model.norm.weight
        length = max_seq_len or model.config.max_seq_len
        self.cache = SlotCache(model.config, 1, length, dtype=cache_dtype(model), device=weight.device)
        self.kept: list[int] = []

    @torch.inference_mode()
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(context) + k >= self.cache.max_len:
            return []
        ctx = list(context)
        reuse = 0
        for a, b in zip(self.kept, ctx[:-1]):  # keep at least the last token to recompute
            if a != b:
                break
            reuse += 1
        self.cache.reserve(1, len(ctx) + k + 1)
        fed, start, out = ctx[reuse:], reuse, []
        device = self.model.norm.weight.device
        for _ in range(k):
            cache = self.cache.view(slice(0, 1), start + len(fed))
            logits = self.model(torch.tensor([fed], device=device), start_pos=start, cache=cache, last_only=True)
            start += len(fed)
            fed = [int(logits[0, -1].argmax())]
            out.append(fed[0])
        self.kept = ctx + out[:-1]  # the last guess was never fed to the draft model
        return out
