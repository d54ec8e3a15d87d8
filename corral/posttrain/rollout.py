"""Rollouts for PPO: responses sampled by Corral's engine from the weights being trained, scored, made into batches.

The engine runs the training model itself (``Engine(actor.policy)``), so every rollout samples from the
current weights with no copy. Its prefix cache is cleared before each rollout: the keys and values slots
still hold were computed by the weights of before the last optimizer step. The log-probs that enter the
loss are not the engine's: the training model recomputes them (corral.train.loss.linear_logprobs through
``ActorCritic``) on the padded batch, so the ratio of the first PPO step is exactly 1.

``RolloutSource`` is the BatchSource the one training loop takes (corral.train.loop): every rollout gives
``epochs * minibatches`` PPOBatches, one per optimizer step; the next rollout is sampled when they are spent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from corral.engine.sampling import SamplingParams
from corral.posttrain.ppo import ActorCritic, PPOBatch, gae_advantages, kl_penalty, whiten
from corral.posttrain.rewards import Scorer
from corral.posttrain.rl_config import PPOConfig
from corral.train.loss import IGNORE_INDEX, sequence_logprobs


@dataclass
class Sample:
    prompt: list[int]
    response: list[int]
    """The sampled ids, ending with the stop token when the model ended its turn."""
    text: str
    finished: bool


def sample_responses(engine, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, seed: int,
                     temperature: float = 1.0) -> list[Sample]:
    """n responses per prompt from the engine, in prompt order. temperature 1, no top-p/top-k: the samples come
    from pi itself, the distribution whose log-probs the loss recomputes (0 is greedy, for evaluation)."""
    requests = [r for i, p in enumerate(prompts)
                for r in engine.submit(p, SamplingParams(temperature=temperature, top_p=1.0, top_k=0, n=n,
                                                         max_new_tokens=max_new_tokens, seed=seed + 1000 * i))]
    stopped_by: dict[int, int] = {}
    while any(not r.done for r in requests):
        for event in engine.step():
            if event.request.done and event.request.finish_reason == "stop":
                stopped_by[event.request.id] = event.choice.token  # the stop token itself is an action too
    samples = []
    for r in requests:
        finished = r.id in stopped_by
        response = list(r.output) + ([stopped_by[r.id]] if finished else [])
        samples.append(Sample(list(r.prompt), response, r.text.text if r.text is not None else "", finished))
    return samples


def pack(samples: Sequence[Sample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (tokens, targets, mask), each (N, L - 1) for the longest prompt + response L.

    Row i holds prompt + response; targets are the next tokens, IGNORE_INDEX on the prompt and the padding;
    mask is True where the target is a response token. Right padding leaves every real token at its position.
    """
    length = max(len(s.prompt) + len(s.response) for s in samples)
    seqs = torch.zeros(len(samples), length, dtype=torch.long)  # (N, L) pad id 0: never a target
    mask = torch.zeros(len(samples), length - 1, dtype=torch.bool)  # (N, L - 1)
    for i, s in enumerate(samples):
        row = s.prompt + s.response
        seqs[i, : len(row)] = torch.tensor(row)
        mask[i, len(s.prompt) - 1: len(row) - 1] = True
    targets = torch.where(mask, seqs[:, 1:], IGNORE_INDEX)
    return seqs[:, :-1].to(device), targets.to(device), mask.to(device)


def score_samples(samples: Sequence[Sample], prompt_texts: Sequence[str], scorer: Scorer,
                  missing_eos_penalty: float = 0.0) -> torch.Tensor:
    """(N,) float32 scores; prompt_texts[i] is the prompt of samples[i]."""
    return torch.tensor([scorer(p, s.text) - (0.0 if s.finished else missing_eos_penalty)
                         for s, p in zip(samples, prompt_texts)], dtype=torch.float32)


@torch.no_grad()
def rollout_batches(actor: ActorCritic, reference: nn.Module, samples: Sequence[Sample], scores: torch.Tensor,
                    params: PPOConfig, device: torch.device, seed: int = 0) -> list[PPOBatch]:
    """Everything PPO needs from one rollout, computed once with the weights that sampled it; its minibatches."""
    tokens, targets, mask = pack(samples, device)
    old_logp, old_values = actor(tokens, targets)  # (N, T) each
    ref_logp = sequence_logprobs(reference, tokens, targets)  # (N, T)
    kl = (old_logp - ref_logp) * mask  # k1 per token
    rewards = kl_penalty(old_logp, ref_logp, params.kl_coef) * mask  # (N, T)
    last = mask.long().cumsum(1).argmax(1)  # (N,) index of each response's last token
    rows = torch.arange(len(samples), device=device)
    rewards[rows, last] += scores.to(device)  # the score arrives with the last action
    advantages, returns = gae_advantages(rewards, old_values * mask, mask, params.gamma, params.lam)
    advantages = whiten(advantages, mask)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    size = -(-len(samples) // params.minibatches)
    batches = []
    for part in order.split(size):
        idx = part.to(device)
        used = int(mask[idx].any(0).nonzero().max()) + 1  # trim the padding this minibatch does not need
        rows_of = {name: x[idx, :used] for name, x in (("tokens", tokens), ("targets", targets), ("mask", mask),
                   ("old_logp", old_logp), ("old_values", old_values), ("advantages", advantages),
                   ("returns", returns), ("kl", kl))}
        batches.append(PPOBatch(**rows_of, scores=scores[part]))
    return batches


class RolloutSource:
    """A BatchSource of PPO minibatches: it samples, scores and prepares a rollout whenever the last is spent.

    prompts are chat-rendered token ids and prompt_texts what the scorer sees. Its position is (rollouts
    made, minibatches taken from the current one); a resumed run samples its next rollout afresh, so resume
    exactly by checkpointing on rollout boundaries (checkpoint.every a multiple of epochs * minibatches).
    """

    def __init__(self, actor: ActorCritic, reference: nn.Module, engine, prompts: Sequence[Sequence[int]],
                 prompt_texts: Sequence[str], scorer: Scorer, params: PPOConfig, seed: int = 0,
                 precision: Callable[[], AbstractContextManager] = nullcontext):
        self.actor, self.reference, self.engine = actor, reference, engine
        self.prompts, self.prompt_texts = [list(p) for p in prompts], list(prompt_texts)
        self.scorer, self.params, self.seed, self.precision = scorer, params, seed, precision
        self.rollouts = 0
        self.queue: list[PPOBatch] = []
        self.last_scores: list[float] = []

    def _prompt_indices(self) -> list[int]:
        """The rollout's prompts: consecutive slices of a shuffled order, reshuffled every pass (seeded)."""
        n, k = len(self.prompts), self.params.prompts_per_rollout
        start = self.rollouts * k
        picked = []
        for pos in range(start, start + k):
            order = list(range(n))
            random.Random(self.seed + pos // n).shuffle(order)
            picked.append(order[pos % n])
        return picked

    def rollout(self) -> list[PPOBatch]:
        p = self.params
        device = self.actor.value_head.weight.device
        picked = self._prompt_indices()
        was_training = self.actor.training
        self.actor.eval()
        try:
            self.engine.clear_prefix_cache()  # cached keys and values came from the weights before the last step
            samples = sample_responses(self.engine, [self.prompts[i] for i in picked], p.samples_per_prompt,
                                       p.max_new_tokens, seed=self.seed + 7919 * self.rollouts)
            texts = [self.prompt_texts[i] for i in picked for _ in range(p.samples_per_prompt)]
            scores = score_samples(samples, texts, self.scorer, p.missing_eos_penalty)
            with self.precision():
                batches = rollout_batches(self.actor, self.reference, samples, scores, p, device,
                                          seed=self.seed + self.rollouts)
        finally:
            self.actor.train(was_training)
        self.rollouts += 1
        self.last_scores = scores.tolist()
        return [b for _ in range(p.epochs) for b in batches]

    def next_batch(self) -> PPOBatch:
        if not self.queue:
            self.queue = self.rollout()
        return self.queue.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts, "pending": len(self.queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts, self.queue = int(state["rollouts"]), []


def build_rollout_source(actor: ActorCritic, tokenizer, stop_ids, prompts: Sequence[Sequence[int]],
                         prompt_texts: Sequence[str], scorer: Scorer, params: PPOConfig, seed: int = 0,
                         precision: Callable[[], AbstractContextManager] = nullcontext, max_prompt_len: int = 0
                         ) -> RolloutSource:
    """A frozen copy of the policy as it is now (the KL reference), an engine over the live policy, the source.

    max_prompt_len: the longest prompt an evaluation will give the engine, when longer than these.
    """
    import copy

    from corral.engine.engine import Engine

    reference = copy.deepcopy(actor.policy).requires_grad_(False).eval()
    longest = max(max_prompt_len, *(len(p) for p in prompts)) + params.max_new_tokens + 2
    engine = Engine(actor.policy, tokenizer, stop_ids=stop_ids, max_seq_len=longest,
                    max_batch_size=params.prompts_per_rollout * params.samples_per_prompt)
    return RolloutSource(actor, reference, engine, prompts, prompt_texts, scorer, params, seed, precision)


@torch.no_grad()
def evaluate_policy(source: RolloutSource, prompts: Sequence[Sequence[int]], prompt_texts: Sequence[str], *,
                    samples: int = 4, greedy: bool = False, seed: int = 12345) -> dict[str, float]:
    """Mean score, KL to the reference (summed over each response, averaged) and length on held prompts.

    Sampled at temperature 1 the KL is the k1 estimate of KL(pi || pi_ref); greedy (one sample) measures
    the policy's single best answer instead.
    """
    engine, actor = source.engine, source.actor
    was_training = actor.training
    actor.eval()
    try:
        engine.clear_prefix_cache()
        n = 1 if greedy else samples
        drawn = sample_responses(engine, prompts, n, source.params.max_new_tokens, seed, 0.0 if greedy else 1.0)
        texts = [t for t in prompt_texts for _ in range(n)]
        scores = score_samples(drawn, texts, source.scorer)
        tokens, targets, mask = pack(drawn, actor.value_head.weight.device)
        logp = sequence_logprobs(actor.policy, tokens, targets)  # (N, T)
        ref_logp = sequence_logprobs(source.reference, tokens, targets)
    finally:
        actor.train(was_training)
    return {"reward": float(scores.mean()), "kl": float(((logp - ref_logp) * mask).sum(1).mean()),
            "response_len": float(mask.sum(1).float().mean()),
            "finished": sum(s.finished for s in drawn) / len(drawn)}
