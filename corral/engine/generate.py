"""The reference generation path: plain eager calls and a simple KV cache.

This is the oracle the fast engine is tested against, so it stays short and obvious:
prefill the prompt once, then decode one token at a time.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence

import torch

from corral.engine.kv_cache import KVCache, cache_dtype
from corral.engine.sampling import SamplingParams, sample_token
from corral.model.llama import Transformer


@torch.inference_mode()
def prefill(model: Transformer, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (1, T) through the model, filling the cache; float32 logits of its last position (vocab,)."""
    return model(prompt, start_pos=0, cache=cache, last_only=True)[0, -1]


@torch.inference_mode()
def decode_one_token(model: Transformer, token: int, pos: int, cache: KVCache) -> torch.Tensor:
    """One new token at position pos -> float32 logits (vocab,) for the next."""
    ids = torch.tensor([[token]], device=cache.k[0].device)
    return model(ids, start_pos=pos, cache=cache)[0, -1]


def generate_tokens(
    model: Transformer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stop_ids: frozenset[int] | set[int] = frozenset(),
    max_seq_len: int | None = None,
) -> Iterator[int]:
    """Yield new token ids; ends after a stop id (which is yielded), max_new_tokens, or the context end."""
    context = max_seq_len or model.config.max_seq_len
    budget = min(params.max_new_tokens, context - len(prompt_ids))
    if budget <= 0:
        return
    dtype = cache_dtype(model)
    device = model.norm.weight.device
    cache = KVCache(model.config, 1, len(prompt_ids) + budget, dtype=dtype, device=device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    logits = prefill(model, torch.tensor([list(prompt_ids)], device=device), cache)
    pos = len(prompt_ids)
    for _ in range(budget):
        token = sample_token(logits, params, generator)
        yield token
        if token in stop_ids:
            return
        logits = decode_one_token(model, token, pos, cache)
        pos += 1


class TextStream:
    """Turns generated token bytes into text deltas that never split a UTF-8 character or reveal a stop string.

    Text that could still become the start of a stop string is held back until it cannot.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Feed the bytes of one token; return the text now safe to show."""
        self.text += self.decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            end = cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held
