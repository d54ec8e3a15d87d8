"""Generation requests (lm-eval's `generate_until`) run through the engine, batched.

Every request is submitted at once; the engine's continuous batching keeps its slots full and its
prefix cache computes a shared few-shot prefix once per slot. Greedy unless a temperature is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corral.engine.engine import completion
from corral.engine.sampling import SamplingParams
from corral.errors import CorralError


class PromptTruncated(UserWarning):
    """A prompt was longer than the context allows and lost its beginning."""


@dataclass(frozen=True)
class GenRequest:
    prompt: str
    until: tuple[str, ...] = ()
    """Stop strings: the output ends before the first one (and does not include it)."""
    max_gen_toks: int = 256
    samples: int = 1
    """Completions of this prompt (pass@k draws several at temperature > 0)."""
    temperature: float = 0.0
    """0 is greedy. Chen et al. 2021 sample at 0.8 for pass@k with large k (0.2 for pass@1), top_p 0.95."""
    seed: int = 1234
    chat: bool = False
    """Send the prompt as one user message through the model's chat template (instruct models)."""


def sampling_for(req: GenRequest) -> SamplingParams:
    if req.temperature == 0:
        return SamplingParams(temperature=0.0, max_new_tokens=req.max_gen_toks, n=req.samples)
    return SamplingParams(temperature=req.temperature, top_p=0.95, n=req.samples, seed=req.seed,
                          max_new_tokens=req.max_gen_toks)


def fit_prompt(ids: list[int], context: int, max_gen_toks: int) -> list[int]:
    """Keep the last tokens when prompt + generation would overflow the context (lm-eval truncates left too)."""
    room = context - min(max_gen_toks, context // 2)
    if len(ids) <= room:
        return ids
    warnings.warn(f"a prompt of {len(ids)} tokens is cut to its last {room} to leave room for "
                  f"{max_gen_toks} generated tokens in a {context}-token context", PromptTruncated, stacklevel=3)
    return ids[len(ids) - room:]


def cut_at(text: str, stops: Sequence[str]) -> str:
    """The text before the first of the stop strings (for backends that apply fewer of them)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def encode_prompt(llm, req: GenRequest) -> list[int]:
    if not req.chat:
        return llm.tokenizer.encode(req.prompt, bos=llm.add_bos)
    if llm.chat_format is None:
        raise CorralError(f"--chat: {llm.name or 'this model'} carries no chat template")
    return llm.chat_format.encode_dialog([{"role": "user", "content": req.prompt}], add_generation_prompt=True)


def generate_local(llm, requests: Sequence[GenRequest], *, progress: Callable[[int], None] | None = None
                   ) -> list[list[str]]:
    """The completions of each request (a list of `samples` strings), in order.

    llm: a corral.LLM (its tokenizer, BOS rule and engine). progress(k) is told when k more finish.
    """
    engine = llm.engine
    submitted = []
    for req in requests:
        ids = encode_prompt(llm, req)
        ids = fit_prompt(ids, engine.max_seq_len, req.max_gen_toks)
        submitted.append(engine.submit(ids, sampling_for(req), stop=req.until))
    flat = [r for group in submitted for r in group]
    finished = 0
    while finished < len(flat):
        engine.step()
        now = sum(r.done for r in flat)
        if progress and now > finished:
            progress(now - finished)
        finished = now
    return [[completion(r).text or "" for r in group] for group in submitted]
