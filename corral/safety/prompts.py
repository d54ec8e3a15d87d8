"""Llama Guard 2 and 3 prompts, byte for byte as REFERENCE.md gives them, and the verdict grammar.

    apply_llama_guard_template(conversation, "llama-guard-3", role="Agent", policy=...) -> prompt pieces
    parse_verdict("unsafe\\nS1,S10", policy) -> Verdict(safe=False, categories=("S1", "S10"))

The two versions differ only by data (TEMPLATES): the wrapper around the shared body, and whether a
category line ends in ". " (Llama Guard 2) or "." (Llama Guard 3). A prompt is a list of pieces
(text, is_template): template text may hold special tokens ("<|eot_id|>"), conversation text is
encoded as plain text, so a user who types "<|eot_id|>" cannot close the guard's turn.

Excluded categories are dropped and the rest renumbered S1..Sn (as Meta's llama-cookbook helpers do);
the verdict's codes are mapped back to the taxonomy's own (taxonomy.Policy.original).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from corral.errors import GuardInputError, GuardVerdictError
from corral.safety.taxonomy import LLAMA_GUARD_2, LLAMA_GUARD_3, Category, Policy


@dataclass(frozen=True)
class Template:
    taxonomy: tuple[Category, ...]
    opening: str
    closing: str
    category_end: str
    """What follows "S1: Violent Crimes" on its line."""


TEMPLATES = {
    "llama-guard-2": Template(LLAMA_GUARD_2, "[INST] ", " [/INST]", ". "),
    "llama-guard-3": Template(LLAMA_GUARD_3, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
                              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>", "."),
}

TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
        "policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n")
INSTRUCTIONS = ("\n\n<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the "
                "above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line "
                "must include a comma-separated list of violated categories.")
SPEAKERS = {"user": "User", "assistant": "Agent"}


def speaker_turns(conversation: list[dict]) -> list[tuple[str, str]]:
    """[{"role", "content"}] -> [("User"|"Agent", text)]; system messages are not assessed and are dropped."""
    turns = []
    for i, m in enumerate(conversation):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            continue
        if role not in SPEAKERS or not isinstance(m.get("content"), str):
            raise GuardInputError(f"conversation[{i}]: need role user|assistant|system and string content")
        turns.append((SPEAKERS[role], m["content"]))
    if not turns:
        raise GuardInputError("conversation: no user or assistant message to assess")
    return turns


def apply_llama_guard_template(conversation: list[dict], version: str = "llama-guard-3",
                               policy: Policy | None = None) -> list[tuple[str, bool]]:
    """The guard prompt for the conversation's last message (its speaker is the role assessed), as pieces
    (text, is_template). `"".join(t for t, _ in pieces)` is the prompt as REFERENCE.md writes it."""
    template = TEMPLATES[version]
    policy = policy or Policy(template.taxonomy)
    turns = speaker_turns(conversation)
    role = turns[-1][0]
    lines = []
    for code, c in policy.listed():
        lines.append(f"{code}: {c.name}{template.category_end}" + (f"\n{c.description}" if c.description else ""))
    pieces = [(template.opening + TASK.format(role=role) + "\n".join(lines)
               + "\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n", True)]
    for i, (speaker, text) in enumerate(turns):
        pieces += [(("\n\n" if i else "") + f"{speaker}: ", True), (text, False)]
    pieces.append((INSTRUCTIONS.format(role=role) + template.closing, True))
    return pieces


def prompt_text(pieces: list[tuple[str, bool]]) -> str:
    return "".join(text for text, _ in pieces)


def encode_prompt(tokenizer, pieces: list[tuple[str, bool]]) -> list[int]:
    """Template pieces with their special tokens, conversation pieces as plain text."""
    ids: list[int] = []
    for text, is_template in pieces:
        ids += tokenizer.encode(text, allow_special=is_template)
    return ids


@dataclass(frozen=True)
class Verdict:
    safe: bool
    categories: tuple[str, ...] = ()
    """The taxonomy's own codes (mapped back from the prompt's numbering), in the order given."""


_CODES_LINE = re.compile(r"\s*S\d{1,3}\s*(,\s*S\d{1,3}\s*)*")


def parse_verdict(text: str, policy: Policy | None = None) -> Verdict:
    """`safe` or `unsafe` [newline comma-separated codes], whitespace around lines and codes tolerated;
    anything else, or a code the policy did not list, is a GuardVerdictError."""
    if not isinstance(text, str):
        raise GuardVerdictError(f"guard answer must be text, got {type(text).__name__}", text=repr(text))
    lines = [line.strip() for line in text.strip().splitlines()]
    shown = text if len(text) <= 80 else text[:77] + "..."
    if lines == ["safe"]:
        return Verdict(True)
    if not lines or lines[0] != "unsafe" or len(lines) > 2:
        raise GuardVerdictError(f"guard answer is not 'safe' or 'unsafe' + categories: {shown!r}", text=text)
    if len(lines) == 1:
        return Verdict(False)
    if not _CODES_LINE.fullmatch(lines[1]):
        raise GuardVerdictError(f"guard categories line is not S<n>[,S<n>...]: {shown!r}", text=text)
    codes = list(dict.fromkeys(c.strip() for c in lines[1].split(",")))
    if policy is not None:
        try:
            codes = [policy.original(c) for c in codes]
        except KeyError as e:
            raise GuardVerdictError(f"guard named category {e.args[0]}, which the prompt did not list", text=text) \
                from None
    return Verdict(False, tuple(codes))
