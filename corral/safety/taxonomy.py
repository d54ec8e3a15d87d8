"""Llama Guard hazard categories as data: Llama Guard 2 (S1-S11) and Llama Guard 3 (S1-S14), both on the
MLCommons AI Safety hazard taxonomy (REFERENCE.md "Llama Guard 2", "Llama Guard 3").

A Category is a code and a name; a policy is the list of categories a prompt lists. Excluding categories
renumbers the rest 1..n as Meta's helpers do (llama-cookbook `prompt_format_utils.py`), and a verdict's
codes are mapped back to the taxonomy's own codes (`Policy.original`), so "S3" in a verdict always means
the third category *listed*, and callers only ever see the taxonomy's codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from corral.errors import ConfigError


@dataclass(frozen=True)
class Category:
    code: str
    """"S1".."S14" in the taxonomy's own numbering."""
    name: str
    description: str = ""
    """Optional text under the name (custom categories); the Llama Guard 2/3 defaults have none."""


def _numbered(names: Sequence[str]) -> tuple[Category, ...]:
    return tuple(Category(f"S{i}", name) for i, name in enumerate(names, 1))


LLAMA_GUARD_2 = _numbered([
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Specialized Advice", "Privacy",
    "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content",
])

LLAMA_GUARD_3 = _numbered([
    "Violent Crimes", "Non-Violent Crimes", "Sex-Related Crimes", "Child Sexual Exploitation", "Defamation",
    "Specialized Advice", "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate",
    "Suicide & Self-Harm", "Sexual Content", "Elections", "Code Interpreter Abuse",
])

TAXONOMIES = {"llama-guard-2": LLAMA_GUARD_2, "llama-guard-3": LLAMA_GUARD_3}


@dataclass(frozen=True)
class Policy:
    """The categories a guard prompt lists, in order; listed code S<i> is `categories[i-1]`."""

    categories: tuple[Category, ...]

    @classmethod
    def of(cls, taxonomy: Sequence[Category], exclude: Iterable[str] = (),
           custom: Sequence[Category] = ()) -> Policy:
        """The taxonomy less the excluded codes (or names), plus custom categories after it."""
        exclude = {e.strip() for e in exclude}
        known = {c.code for c in taxonomy} | {c.name for c in taxonomy}
        unknown = sorted(exclude - known)
        if unknown:
            raise ConfigError(f"exclude: unknown category {unknown[0]!r} (known: "
                              f"{', '.join(c.code for c in taxonomy)})")
        kept = tuple(c for c in taxonomy if c.code not in exclude and c.name not in exclude)
        taken = {c.code for c in taxonomy}
        for c in custom:
            if c.code in taken:
                raise ConfigError(f"custom category {c.code} repeats a code of the taxonomy")
            taken.add(c.code)
        policy = cls(kept + tuple(custom))
        if not policy.categories:
            raise ConfigError("exclude: every category is excluded; nothing would be checked")
        return policy

    def listed(self) -> list[tuple[str, Category]]:
        """(the code the prompt shows, category): renumbered 1..n in listing order."""
        return [(f"S{i}", c) for i, c in enumerate(self.categories, 1)]

    def original(self, listed_code: str) -> str:
        """A verdict's code (the prompt's numbering) -> the category's own code; KeyError if not listed."""
        i = int(listed_code[1:]) if listed_code[:1] == "S" and listed_code[1:].isdigit() else 0
        if not 1 <= i <= len(self.categories):
            raise KeyError(listed_code)
        return self.categories[i - 1].code

    def names(self) -> dict[str, str]:
        return {c.code: c.name for c in self.categories}
