"""The config sections of the RL objectives: ``[ppo]``, ``[rs]`` (rejection sampling) and ``[reward]``.

Plain dataclasses with a docstring under each field, loaded strictly like every *Config (corral.config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corral.errors import ConfigError


@dataclass
class RewardConfig:
    kind: str = "keyword"
    """What scores responses (corral.posttrain.rewards.REWARDS): "keyword" (a program) or "model" (a reward
    model trained by objective = "rm", at reward.model_path)."""
    keyword: str = "Here"
    """kind = "keyword": the word a good response contains (whole word, any case)."""
    max_words: int = 12
    """kind = "keyword": a good response has at most this many words."""
    model_path: str = ""
    """kind = "model": the model directory a reward-model run wrote (with reward_head.safetensors)."""


@dataclass
class PPOConfig:
    kl_coef: float = 0.05
    """beta of the per-token KL penalty to the frozen reference policy (k1 estimator)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip: float = 0.2
    """How far the value may move from the rollout's before its loss stops pulling."""
    vf_coef: float = 0.1
    """Weight of the value loss (the value head shares the policy's trunk)."""
    prompts_per_rollout: int = 4
    """Prompts sampled per rollout."""
    samples_per_prompt: int = 4
    """Responses per prompt in a rollout."""
    max_new_tokens: int = 24
    """Longest response sampled."""
    epochs: int = 1
    """Passes over each rollout; each minibatch of each pass is one optimizer step."""
    minibatches: int = 2
    """Minibatches per rollout."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response cut off by max_new_tokens."""
    eval_samples: int = 4
    """Responses per held prompt when the run measures reward and KL before and after training."""


@dataclass
class RSConfig:
    k: int = 4
    """Responses sampled per prompt; the best-scored one is kept for SFT."""
    rounds: int = 3
    """Sample -> select -> SFT rounds; each round samples from the weights the last one left."""
    prompts_per_round: int = 12
    """Training prompts sampled in each round."""
    steps_per_round: int = 4
    """SFT optimizer steps on each round's kept responses (train.steps = rounds * steps_per_round)."""
    batch_size: int = 4
    """Kept responses per SFT micro-batch."""
    max_new_tokens: int = 24
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature of the k candidates (Llama 3 sampled at a high temperature to get diversity)."""


def check_rl_sections(ppo: PPOConfig, rs: RSConfig, reward: RewardConfig) -> None:
    """Value checks types cannot make; each error names the dotted key."""
    positive = {"ppo.prompts_per_rollout": ppo.prompts_per_rollout, "ppo.samples_per_prompt": ppo.samples_per_prompt,
                "ppo.max_new_tokens": ppo.max_new_tokens, "ppo.epochs": ppo.epochs,
                "ppo.minibatches": ppo.minibatches, "ppo.eval_samples": ppo.eval_samples, "rs.k": rs.k,
                "rs.rounds": rs.rounds, "rs.prompts_per_round": rs.prompts_per_round,
                "rs.steps_per_round": rs.steps_per_round, "rs.batch_size": rs.batch_size,
                "rs.max_new_tokens": rs.max_new_tokens, "ppo.clip": ppo.clip, "ppo.value_clip": ppo.value_clip}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive; got {value!r}")
    if ppo.kl_coef < 0 or ppo.vf_coef < 0 or rs.temperature < 0:
        raise ConfigError("ppo.kl_coef, ppo.vf_coef and rs.temperature must not be negative")
    if not (0 <= ppo.gamma <= 1 and 0 <= ppo.lam <= 1):
        raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1]; got {ppo.gamma}, {ppo.lam}")
    if ppo.minibatches > ppo.prompts_per_rollout * ppo.samples_per_prompt:
        raise ConfigError("ppo.minibatches exceeds the responses of one rollout "
                          "(ppo.prompts_per_rollout * ppo.samples_per_prompt)")


def build_scorer(config: RewardConfig, chat_format) -> Callable[[str, str], float]:
    """The [reward] table as a score(prompt, response) callable."""
    from corral.posttrain.rewards import REWARDS

    if config.kind not in REWARDS:
        raise ConfigError(f"reward.kind {config.kind!r} is unknown; choose one of {', '.join(REWARDS)}")
    return REWARDS[config.kind](config, chat_format)
