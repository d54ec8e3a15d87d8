"""Per-request sampling options, and the samplers: one row (reference path) and a batch (the engine).

Order of the logit processors, the same as llama.cpp's and vLLM's defaults:
logit_bias -> repetition penalty -> presence/frequency penalties -> (log-probs read here)
-> temperature -> top_k -> top_p -> min_p -> draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from corral.errors import CorralError


class SamplingError(CorralError, ValueError):
    """A sampling parameter is out of range."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6
    """0 means greedy; Meta's reference default is 0.6."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's (0 = off)."""
    repetition_penalty: float = 1.0
    """CTRL-style (Keskar et al. 2019): logits of tokens already in the prompt or output are divided
    by it when positive, multiplied when negative (1 = off)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtracted per occurrence of a token in the generated text."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of the given token ids before anything else (-100 bans, +100 forces)."""
    seed: int | None = None
    """Same seed, same prompt, same output."""
    n: int = 1
    """Independent samples of the same prompt (they share one prefill)."""
    max_new_tokens: int = 256
    """Generated tokens at most (the context length may end generation earlier)."""
    ignore_eos: bool = False
    """Keep going past stop tokens (benchmarks)."""
    logprobs: int | None = None
    """Return the log-probability of each chosen token and of this many top alternatives (0 = chosen only)."""

    def __post_init__(self) -> None:
        bad = self.problems()
        if bad:
            raise SamplingError("; ".join(bad))

    def problems(self, vocab_size: int | None = None) -> list[str]:
        """Every out-of-range field, each as '<name> must be ..., got ...'."""
        out = []

        def need(ok: bool, name: str, rule: str):
            if not ok:
                out.append(f"{name} must be {rule}, got {getattr(self, name)!r}")

        need(_is_num(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0")
        need(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0")
        need(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        need(_is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "a number > 0")
        need(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        need(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]")
        need(self.seed is None or _is_int(self.seed), "seed", "an integer")
        need(_is_int(self.n) and 1 <= self.n <= 128, "n", "an integer in [1, 128]")
        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        need(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs",
             "an integer in [0, 20]")
        bias_ok = isinstance(self.logit_bias, dict) and all(
            _is_int(k) and k >= 0 and (vocab_size is None or k < vocab_size) and _is_num(v) and -100 <= v <= 100
            for k, v in self.logit_bias.items())
        need(bias_ok, "logit_bias", "a map of token ids" + (f" in [0, {vocab_size})" if vocab_size else "")
             + " to numbers in [-100, 100]")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The reference sampler: temperature and top_p only, one row of float32 logits (vocab,)."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Choice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    """(token id, log-prob) of the most likely alternatives, best first."""


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                    counts: torch.Tensor | None) -> torch.Tensor:
    """Bias and penalties for one row (vocab,). seen: ids in prompt and output; counts: (vocab,) generated counts."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device, dtype=logits.dtype)
    if params.repetition_penalty != 1 and seen is not None and seen.numel():
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top_k, top_p and min_p as -inf masks on one row (vocab,)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # the first token always stays
        logits = logits.index_put((order[drop],), torch.tensor(-math.inf, device=logits.device))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return logits


def choose(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
) -> list[Choice]:
    """One token for each row of float32 logits (B, vocab); history[i] is (seen ids, generated counts) or None."""
    if all(p.greedy and not p.logit_bias and not p.penalized and p.logprobs is None for p in params):
        return [Choice(int(t)) for t in logits.argmax(-1).tolist()]  # the hot path: one kernel, one sync
    out = []
    for row, p, gen, hist in zip(logits, params, generators, history):
        row = apply_penalties(row.clone(), p, *(hist or (None, None)))
        if p.greedy:
            token = int(row.argmax())
        else:
            probs = truncate(row, p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        choice = Choice(token)
        if p.logprobs is not None:
            logprobs = row.log_softmax(-1)
            choice.logprob = float(logprobs[token])
            if p.logprobs:
                top = logprobs.topk(p.logprobs)
                choice.top = list(zip(top.indices.tolist(), top.values.tolist()))
        out.append(choice)
    return out
