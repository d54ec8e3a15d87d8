"""Log-likelihood of continuations, as lm-evaluation-harness defines it, on any Corral model.

For a request (context, continuation) lm-eval moves the context's trailing spaces onto the continuation,
encodes context and context + continuation, and takes the continuation's tokens as the whole encoding
minus the context's first len(context tokens) ids (so a BPE merge across the boundary is scored the way
lm-eval scores it). The result is (sum of log p(continuation token | everything before), whether every
continuation token is the argmax). An empty context is the model's BOS (else EOS) token. Inputs longer
than the model's context keep their last max_length + 1 tokens (a warning says so).

Speed: requests that share a context are scored together. The context is run once (its keys and values
go into a KV cache row), then every continuation of it in one batched forward that reads that row; the
next context reuses the cached tokens it shares with the last one (a few-shot prefix is run once per
subject, not once per question). Log-probabilities come from corral.train.loss.linear_logprobs_top, the
same chunked projection the training losses use (DESIGN: one log-likelihood path).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from corral.engine.engine import shared_prefix
from corral.engine.kv_cache import KVCache, cache_dtype
from corral.errors import CorralError
from corral.eval.generation import GenRequest, generate_local
from corral.train.loss import linear_logprobs_top, output_weight

Tokens = list[int]
CHUNK = 512
"""Tokens per forward when a context or continuation is long (bounds the attention scores' memory)."""


class ContextTruncated(UserWarning):
    """A request was longer than the model's context; its start was dropped (lm-eval's left truncation)."""


def projection_weight(model: torch.nn.Module) -> torch.Tensor:
    """The (vocab, dim) float output projection; a quantized one (GGUF blocks, int8/int4) is widened once."""
    out = model.output
    weight = getattr(out, "weight", None) if out is not None else None
    if out is None or (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        return output_weight(model).float()
    return out.dequantize().float()


@dataclass
class _Prefix:
    """What row 0 of the cache holds: the ids at positions 0..len(ids)-1."""

    ids: Tokens
    cache: KVCache | None = None
    rows: int = 0
    length: int = 0


class LocalModel:
    """A Corral Transformer + tokenizer as a log-likelihood backend (what `corral eval MODEL` scores with)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, add_bos: bool, max_length: int | None = None,
                 name: str = "", batch_size: int = 32):
        self.model, self.tokenizer, self.add_bos, self.name = model, tokenizer, add_bos, name
        self.max_length = max_length or model.config.max_seq_len
        self.batch_size = batch_size
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        self._weight: torch.Tensor | None = None
        self._kept = _Prefix([])

        self.llm = None
        """The corral.LLM whose engine runs generation tasks (set by from_llm)."""

    @classmethod
    def from_llm(cls, llm, **kwargs) -> LocalModel:
        backend = cls(llm.model, llm.tokenizer, add_bos=llm.add_bos, name=llm.name, **kwargs)
        backend.llm = llm
        return backend

    def generate(self, requests: Sequence[GenRequest], progress: Callable[[int], None] | None = None
                 ) -> list[list[str]]:
        """Completions of each GenRequest through the engine (batched; see generation.py)."""
        if self.llm is None:
            raise CorralError("generation tasks need a model loaded with LocalModel.from_llm")
        return generate_local(self.llm, requests, progress=progress)

    # ---- tokenizing the lm-eval way ----------------------------------------------------------------

    def encode(self, text: str) -> Tokens:
        return self.tokenizer.encode(text, bos=self.add_bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[Tokens, Tokens]:
        if not context:
            return [self.prefix_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Answer: " + "B" is scored as "Answer:" + " B"
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- scoring -------------------------------------------------------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: Callable[[int], None] | None = None
                      ) -> list[tuple[float, bool]]:
        """(sum log p, is_greedy) per (context, continuation) pair, in order."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], progress)

    def loglikelihood_tokens(self, items: Sequence[tuple[Tokens, Tokens]],
                             progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """As loglikelihood, for already encoded (context ids, continuation ids); contexts must be non-empty."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(items):
            groups.setdefault(tuple(ctx), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(items)
        with torch.inference_mode():
            for ctx, members in groups.items():
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    scores = self._score_group(list(ctx), [items[i][1] for i in batch])
                    for i, score in zip(batch, scores):
                        results[i] = score
                    if progress is not None:
                        progress(len(batch))
        return results

    def _score_group(self, ctx: Tokens, conts: list[Tokens]) -> list[tuple[float, bool]]:
        longest = max(len(c) for c in conts)
        if longest == 0:
            return [(0.0, True)] * len(conts)
        keep = self.max_length + 1 - longest  # lm-eval keeps the last max_length + 1 tokens of ctx + cont
        if len(ctx) > keep:
            warnings.warn(f"a {len(ctx) + longest}-token request is longer than the model's {self.max_length}-token"
                          f" context; its first {len(ctx) - max(keep, 1)} tokens are dropped",
                          ContextTruncated, stacklevel=3)
            if keep < 1:  # the continuation alone overflows: keep its last max_length tokens after one context token
                ctx, conts = ctx[-1:], [c[-self.max_length:] for c in conts]
                longest = max(len(c) for c in conts)
            else:
                ctx = ctx[-keep:]
        start = len(ctx) - 1  # the last context token is fed with the continuations: it predicts their first token
        cache = self._prefill(ctx[:-1], rows=len(conts), length=start + longest)
        # (B, T): the last context token, then each continuation but its last token; right-padded
        inputs = torch.zeros(len(conts), longest, dtype=torch.long)
        targets = torch.full((len(conts), longest), -1, dtype=torch.long)
        for row, cont in enumerate(conts):
            inputs[row, : len(cont)] = torch.tensor(ctx[-1:] + cont[:-1])
            targets[row, : len(cont)] = torch.tensor(cont)
        logprob = torch.zeros(len(conts), dtype=torch.float64)
        greedy = torch.ones(len(conts), dtype=torch.bool)
        for lo in range(0, longest, CHUNK):  # padded positions sit after every real one: causal attention ignores them
            h = self.model.hidden(inputs[:, lo:lo + CHUNK], start + lo, cache)  # (B, t, dim)
            lp, top = self._token_scores(h, targets[:, lo:lo + CHUNK])
            logprob += lp
            greedy &= top
        return [(float(lp), bool(g)) for lp, g in zip(logprob, greedy)]

    def _token_scores(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, t, dim), targets (B, t) with -1 for padding -> summed log p (B,) and all-argmax (B,)."""
        if self._weight is None:
            self._weight = projection_weight(self.model)
        real = targets >= 0  # (B, t)
        rows = h[real]  # (n, dim): only the scored positions go through the (vocab, dim) projection
        lp, top = linear_logprobs_top(rows, self._weight, targets[real])  # (n,) float32, (n,) bool
        owner = real.nonzero()[:, 0]  # (n,) batch row of each scored position
        summed = torch.zeros(h.shape[0], dtype=torch.float64).index_add_(0, owner, lp.double())
        misses = torch.zeros(h.shape[0], dtype=torch.long).index_add_(0, owner, (~top).long())
        return summed, misses == 0

    def _prefill(self, ids: Tokens, rows: int, length: int) -> KVCache:
        """A cache whose first `rows` rows hold ids' keys and values at positions 0..len(ids)-1."""
        kept = self._kept
        if kept.cache is None or kept.rows < rows or kept.length < length:
            # sized for this request only (rounded up), so a long rolling window never multiplies a later row count
            grown = KVCache(self.model.config, rows, -(-length // 256) * 256, dtype=cache_dtype(self.model))
            shared = shared_prefix(kept.ids, ids)
            if kept.cache is not None and shared:
                for new, old in zip(grown.k + grown.v, kept.cache.k + kept.cache.v):
                    new[0, :, :shared] = old[0, :, :shared]
            kept.cache, kept.rows, kept.length = grown, grown.k[0].shape[0], grown.max_seq_len
        shared = shared_prefix(kept.ids, ids)
        for lo in range(shared, len(ids), CHUNK):  # only what the last context did not already compute
            self.model.hidden(torch.tensor([ids[lo:lo + CHUNK]]), lo, kept.cache)
        kept.ids = list(ids)
        if rows > 1 and ids:  # every continuation row reads the same context
            for layer in kept.cache.k + kept.cache.v:
                layer[1:rows, :, : len(ids)] = layer[0:1, :, : len(ids)]
        return kept.cache

    # ---- perplexity ----------------------------------------------------------------------------------

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Callable[[int], None] | None = None
                              ) -> list[float]:
        """Total log p of each whole text, in disjoint windows of at most max_length predicted tokens, each
        seeing as much preceding text as fits (lm-eval's loglikelihood_rolling)."""
        out = []
        for text in texts:
            windows = rolling_windows(self.tokenizer.encode(text, bos=False), self.prefix_id, self.max_length)
            out.append(sum(lp for lp, _ in self.loglikelihood_tokens(windows)))
            if progress is not None:
                progress(1)
        return out


def rolling_windows(ids: Tokens, prefix_id: int, max_length: int) -> list[tuple[Tokens, Tokens]]:
    """(context, predicted) windows that predict every token once: the first window predicts ids[:max_length]
    after the prefix token; each next one predicts the following max_length ids after as many earlier ids as
    fill the model's context (so context + predicted = max_length + 1 tokens, the last input token unscored)."""
    windows = [([prefix_id], ids[:max_length])] if ids else []
    for start in range(max_length, len(ids), max_length):
        pred = ids[start:start + max_length]
        ctx = ids[max(0, start + len(pred) - max_length - 1):start]
        windows.append((ctx, pred))
    return windows
