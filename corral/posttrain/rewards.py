"""Programmatic rewards: plain ``score(prompt, response) -> float`` callables, the same shape a reward model takes.

PPO and rejection sampling only ever call a scorer, so a program (here) and a trained reward model
(corral.posttrain's reward-model objective) are interchangeable.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from corral.errors import ConfigError


def keyword_reward(keyword: str, max_words: int) -> Callable[[str, str], float]:
    """0.5 if the response contains ``keyword`` (a whole word, any case) + 0.5 if it has at most max_words words."""
    if not keyword.strip():
        raise ConfigError("reward.keyword must be a non-empty word")
    if max_words <= 0:
        raise ConfigError(f"reward.max_words must be positive; got {max_words}")
    pattern = re.compile(rf"(?<!\w){re.escape(keyword.strip())}(?!\w)", re.IGNORECASE)

    def score(prompt: str, response: str) -> float:
        has_keyword = pattern.search(response) is not None
        short = len(response.split()) <= max_words
        return 0.5 * has_keyword + 0.5 * short

    return score


REWARDS: dict[str, Callable[..., Callable[[str, str], float]]] = {
    "keyword": keyword_reward,
}
"""reward.kind -> the function that builds the scorer from the rest of the [reward] table."""
