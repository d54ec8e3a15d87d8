"""Rejection sampling as Llama 3 did it (Llama 3 paper, arXiv 2407.21783, section 4.2.2; Touvron et al. 2023,
arXiv 2307.09288, section 3.2.3): for each prompt, k responses sampled from the latest policy, scored by the
reward model (here any ``score(prompt, response)`` callable: a reward model or a program), the best one kept,
then SFT on the kept responses; repeated for several rounds, each sampling from the weights the last one left.

``RejectionSource`` is the BatchSource of the one training loop (corral.train.loop): each round gives
``steps_per_round`` SFT micro-batches; the next round is sampled when they are spent. Sampling runs on
Corral's engine over the live model, its prefix cache cleared first (cached keys came from older weights).
``greedy_score`` on held prompts, run as the loop's evaluation every ``steps_per_round`` steps, shows the
score round over round.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from corral.posttrain.data import TokenBatch
from corral.posttrain.rl_config import RSConfig
from corral.posttrain.rollout import Sample, Scorer, pack, sample_responses, score_samples
from corral.posttrain.sft import sft_loss


@dataclass
class SFTBatch:
    batch: TokenBatch
    """Prompt + kept response per row, right-padded; targets only on the response (loss on the assistant's tokens)."""
    stats: dict[str, float] = field(default_factory=dict)
    """The round's figures, logged with every step of it."""


def best_of_k(samples: Sequence[Sample], scores: torch.Tensor, k: int) -> tuple[list[Sample], list[float]]:
    """The best-scored response of each prompt's k consecutive samples (the first one on ties)."""
    kept, best = [], []
    for start in range(0, len(samples), k):
        i = start + int(scores[start:start + k].argmax())
        kept.append(samples[i])
        best.append(float(scores[i]))
    return kept, best


def rs_sft_loss(model: nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The SFT objective's loss (corral.posttrain.sft) on the kept responses, with the round's figures."""
    loss, metrics = sft_loss(model, batch.batch)
    return loss, {**metrics, **batch.stats}


@torch.no_grad()
def greedy_score(engine, prompts: Sequence[Sequence[int]], texts: Sequence[str], scorer: Scorer,
                 max_new_tokens: int) -> float:
    """Mean score of the greedy reply to each prompt, from the engine's current weights."""
    engine.clear_prefix_cache()
    drawn = sample_responses(engine, prompts, 1, max_new_tokens, seed=0, temperature=0.0)
    return float(score_samples(drawn, texts, scorer).mean())


class RejectionSource:
    """A BatchSource of SFT micro-batches over each round's best-of-k responses (see the module docstring)."""

    def __init__(self, model: nn.Module, engine, prompts: Sequence[Sequence[int]], texts: Sequence[str],
                 scorer: Scorer, params: RSConfig, seed: int = 0):
        self.model, self.engine, self.scorer, self.params, self.seed = model, engine, scorer, params, seed
        self.prompts, self.texts = [list(p) for p in prompts], list(texts)
        self.round = 0
        self.queue: list[SFTBatch] = []
        self.history: list[dict[str, float]] = []
        """One record per round: the mean score of all samples and of the kept ones."""

    def _sample_round(self) -> tuple[list[Sample], list[float], float]:
        p = self.params
        rng = random.Random(self.seed + self.round)
        picked = rng.sample(range(len(self.prompts)), min(p.prompts_per_round, len(self.prompts)))
        self.engine.clear_prefix_cache()  # the cached keys and values came from the weights before the last SFT
        samples = sample_responses(self.engine, [self.prompts[i] for i in picked], p.k, p.max_new_tokens,
                                   seed=self.seed + 7919 * self.round, temperature=p.temperature)
        scores = score_samples(samples, [self.texts[i] for i in picked for _ in range(p.k)], self.scorer)
        kept, best = best_of_k(samples, scores, p.k)
        return kept, best, float(scores.mean())

    def next_round(self) -> list[SFTBatch]:
        p = self.params
        was_training = self.model.training
        self.model.eval()
        try:
            kept, best, sampled = self._sample_round()
        finally:
            self.model.train(was_training)
        self.round += 1
        stats = {"round": float(self.round), "sample_score": sampled,
                 "kept_score": sum(best) / len(best)}
        self.history.append(stats)
        device = self.model.norm.weight.device
        order = [i % len(kept) for i in range(p.steps_per_round * p.batch_size)]  # epochs over the kept set
        batches = []
        for start in range(0, len(order), p.batch_size):
            rows = [kept[i] for i in order[start:start + p.batch_size]]
            tokens, targets, _ = pack(rows, device)  # (B, L - 1) each
            lengths = torch.tensor([len(r.prompt) + len(r.response) - 1 for r in rows], device=device)
            batches.append(SFTBatch(TokenBatch(tokens, targets, lengths), stats))
        return batches

    def next_batch(self) -> SFTBatch:
        if not self.queue:
            self.queue = self.next_round()
        return self.queue.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run samples its next round afresh from the restored weights."""
        self.round, self.history, self.queue = int(state["round"]), list(state["history"]), []


def build_rejection_source(model: nn.Module, tokenizer, stop_ids, prompts: Sequence[Sequence[int]],
                           texts: Sequence[str], scorer: Scorer, params: RSConfig, seed: int = 0,
                           max_prompt_len: int = 0) -> RejectionSource:
    """An engine over the live model (k samples of a prompt share its prefill) and the source. max_prompt_len:
    the longest prompt anyone else (an evaluation) will give the engine, if longer than these."""
    from corral.engine.engine import Engine

    longest = max(max_prompt_len, *(len(x) for x in prompts)) + params.max_new_tokens + 2
    engine = Engine(model, tokenizer, stop_ids=stop_ids, max_seq_len=longest,
                    max_batch_size=min(16, params.k * params.prompts_per_round))
    return RejectionSource(model, engine, prompts, texts, scorer, params, seed)
