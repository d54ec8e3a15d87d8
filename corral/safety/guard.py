"""Guards: a Llama Guard model a user has, or the embedded probe; one `assess(conversation)` for both.

    guard = load_guard(None)                         # the embedded guard (corral/safety/embedded.py)
    guard = load_guard("Llama-Guard-3-1B-Q8_0.gguf")  # any Llama Guard as GGUF/HF path or store name
    a = guard.assess([{"role": "user", "content": "..."}])   # the LAST message is the one assessed
    a.flagged, a.categories ("S1", ...), a.score = P(unsafe), a.category_scores

A Llama Guard model's score is the first generated token's probability (REFERENCE.md): the softmax of
the prompt's next-token logits restricted to the first tokens of "unsafe" and "safe",
P(unsafe) = e^l_u / (e^l_u + e^l_s), flagged at >= threshold (0.5). Its verdict is decoded greedily and
parsed strictly (prompts.parse_verdict): an answer outside the grammar is a GuardVerdictError, which the
server treats as "unsafe" unless told to fail open.

Long messages are assessed in overlapping token segments, each within the guard's context, so no part
of a message goes unchecked; the worst segment decides.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from corral.errors import ConfigError
from corral.safety.embedded import Head, conversation_block, features
from corral.safety.prompts import TEMPLATES, apply_llama_guard_template, encode_prompt, parse_verdict, speaker_turns
from corral.safety.taxonomy import LLAMA_GUARD_3, Category, Policy

SEGMENT_OVERLAP = 16
"""Tokens each segment repeats from the one before: a phrase cut at a border is whole in one of them."""


@dataclass
class Assessment:
    flagged: bool
    categories: tuple[str, ...]
    """Violated categories, in the taxonomy's own codes (S1..S14 for Llama Guard 3)."""
    score: float
    """P(unsafe) of the worst segment."""
    category_scores: dict[str, float] = field(default_factory=dict)
    role: str = "User"
    segments: int = 1


class Guard(Protocol):
    name: str
    policy: Policy

    def assess(self, conversation: list[dict]) -> Assessment: ...


def segments(tokenizer, text: str, size: int, overlap: int = SEGMENT_OVERLAP) -> list[str]:
    """text -> pieces of at most `size` tokens, each starting `overlap` tokens before the last one ended."""
    ids = tokenizer.encode(text)
    if len(ids) <= size:
        return [text]
    step = max(size - overlap, 1)
    return [tokenizer.decode(ids[i:i + size]) for i in range(0, len(ids) - overlap, step)]


def with_last(conversation: list[dict], text: str) -> list[dict]:
    return [*conversation[:-1], {**conversation[-1], "content": text}]


class LlamaGuard:
    """A Llama Guard model (2 or 3, picked by its tokenizer: Llama 3 header tokens -> 3) on corral.load."""

    def __init__(self, llm, *, version: str | None = None, policy: Policy | None = None, threshold: float = 0.5,
                 name: str = "", max_new_tokens: int = 16):
        self.llm, self.threshold, self.name = llm, threshold, name or llm.name
        self.version = version or ("llama-guard-3" if "<|start_header_id|>" in llm.tokenizer.special_tokens
                                   else "llama-guard-2")
        self.policy = policy or Policy(TEMPLATES[self.version].taxonomy)
        self.first = [llm.tokenizer.encode(w)[0] for w in ("safe", "unsafe")]
        if self.first[0] == self.first[1]:
            raise ConfigError(f"{self.name}: 'safe' and 'unsafe' start with the same token; cannot score")
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def assess(self, conversation: list[dict]) -> Assessment:
        role = speaker_turns(conversation)[-1][0]
        worst = None
        for part in self._parts(conversation):
            a = self._assess_one(part, role)
            worst = a if worst is None or (a.flagged, a.score) > (worst.flagged, worst.score) else worst
        return worst

    def _parts(self, conversation: list[dict]) -> list[list[dict]]:
        """The conversation once per segment of its last message, earlier turns dropped from the front
        while the prompt would pass half the context."""
        context = self.llm.engine.max_seq_len
        while len(conversation) > 1 and self._tokens(conversation[:-1] + [with_last(conversation, "")]) > context // 2:
            conversation = conversation[1:]
        room = context - self._tokens(with_last(conversation, "")) - self.max_new_tokens - 8
        if room < 32:
            raise ConfigError(f"{self.name}: context of {context} tokens leaves no room for a message")
        return [with_last(conversation, s) for s in segments(self.llm.tokenizer, conversation[-1]["content"], room)]

    def _tokens(self, conversation: list[dict]) -> int:
        return len(encode_prompt(self.llm.tokenizer, apply_llama_guard_template(conversation, self.version,
                                                                                self.policy)))

    def _assess_one(self, conversation: list[dict], role: str) -> Assessment:
        ids = encode_prompt(self.llm.tokenizer, apply_llama_guard_template(conversation, self.version, self.policy))
        with self.lock, torch.inference_mode():
            logits = self.llm.model(torch.tensor([ids]), last_only=True)[0, -1]  # (vocab,) next-token logits
            score = float(torch.softmax(logits[self.first].float(), dim=-1)[1])
            text = self.llm.generate(ids, temperature=0.0, max_new_tokens=self.max_new_tokens).text
        verdict = parse_verdict(text, self.policy)
        flagged = score >= self.threshold
        cats = verdict.categories if flagged else ()
        return Assessment(flagged, cats, score, {c: score if c in cats else 0.0 for c in self.policy.names()}, role)


class EmbeddedGuard:
    """The probe on the embedded SmolLM2's trunk (embedded.py), on Llama Guard 3's categories.

    Excluded categories are not reported, and a message whose only firing categories are excluded is not
    flagged; custom categories need a Llama Guard model (a probe knows only what it was fitted on)."""

    name = "corral-guard"

    def __init__(self, llm=None, head: Head | None = None, policy: Policy | None = None,
                 threshold: float | None = None):
        if llm is None:
            from corral.llm import load

            llm = load()
        self.llm, self.head = llm, head or Head.load()
        self.policy = policy or Policy(LLAMA_GUARD_3)
        unknown = [c.code for c in self.policy.categories if c.code not in self.head.codes
                   or c not in LLAMA_GUARD_3]
        if unknown:
            raise ConfigError(f"the embedded guard knows Llama Guard 3's S1-S14 only, not {unknown[0]} "
                              "(custom categories need a Llama Guard model: --guard PATH)")
        self.threshold = self.head.threshold if threshold is None else threshold
        self.lock = threading.Lock()

    def assess(self, conversation: list[dict]) -> Assessment:
        role, text = speaker_turns(conversation)[-1]
        # room for BOS and the "User: " prefix around the message
        parts = segments(self.llm.tokenizer, text, self.head.spec.max_tokens - 4)
        with self.lock:
            x = features(self.llm, [conversation_block(role, p) for p in parts], self.head.spec)
        probs = self.head.probabilities(x).max(dim=0).values  # (1 + codes,): the worst segment per output
        score = float(probs[0])
        kept = self.policy.names()
        scores = {c: float(p) for c, p in zip(self.head.codes, probs[1:].tolist()) if c in kept}
        firing = [c for c, p in zip(self.head.codes, probs[1:].tolist()) if p >= self.threshold]
        cats = tuple(c for c in firing if c in kept)
        flagged = score >= self.threshold and (bool(cats) or not firing)
        return Assessment(flagged, cats if flagged else (), score, scores, role, len(parts))


def load_guard(spec: str | Path | None = None, *, exclude: tuple[str, ...] = (), custom: tuple[Category, ...] = (),
               threshold: float | None = None, store=None) -> Guard:
    """None or "embedded": the embedded guard; a path (GGUF, HF or Meta folder) or a store name: a Llama Guard."""
    if spec in (None, "", "embedded"):
        return EmbeddedGuard(policy=Policy.of(LLAMA_GUARD_3, exclude, custom), threshold=threshold)
    if Path(spec).exists():
        from corral.llm import load

        llm = load(Path(spec))
    else:
        from corral.store import Store
        from corral.store.load import load_stored

        llm, _ = load_stored(store or Store(), str(spec))
    guard = LlamaGuard(llm, name=str(spec), threshold=0.5 if threshold is None else threshold)
    guard.policy = Policy.of(TEMPLATES[guard.version].taxonomy, exclude, custom)
    return guard
