"""What scores a response for PPO and rejection sampling: plain ``score(prompt, response) -> float`` callables.

PPO and rejection sampling only ever call a scorer, so a program (``keyword_reward``) and a reward model
trained by the "rm" objective (``reward_model_scorer``) are interchangeable. ``REWARDS`` maps the
``reward.kind`` of a config to the function that builds one from the [reward] table and the chat format.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from corral.errors import ConfigError

Scorer = Callable[[str, str], float]


def keyword_reward(keyword: str, max_words: int) -> Scorer:
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


def reward_model_scorer(path: str | Path, chat_format, device: torch.device | str = "cpu") -> Scorer:
    """A reward model written by ``corral finetune`` (objective = "rm") scoring the rendered user/assistant turn."""
    from corral.posttrain.reward import load_reward_model

    if not str(path):
        raise ConfigError("reward.model_path is empty: name the directory a reward-model run wrote (its model/)")
    model = load_reward_model(path, device=device).requires_grad_(False)

    @torch.no_grad()
    def score(prompt: str, response: str) -> float:
        ids = chat_format.encode_dialog([{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": response}], add_generation_prompt=False)
        tokens = torch.tensor([ids], device=model.head.weight.device)  # (1, T)
        return float(model(tokens, torch.tensor([len(ids)]))[0])

    return score


REWARDS: dict[str, Callable[..., Scorer]] = {
    "keyword": lambda config, chat_format: keyword_reward(config.keyword, config.max_words),
    "model": lambda config, chat_format: reward_model_scorer(config.model_path, chat_format),
}
"""reward.kind -> builder(RewardConfig, chat format) -> scorer."""
