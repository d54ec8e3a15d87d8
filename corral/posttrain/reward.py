"""Reward model: a scalar head on the transformer trunk, trained on preference pairs.

The reward of a sequence is a linear head on the trunk's final-norm hidden state at its last token
(``Transformer.hidden``; the output projection is not used). Pairs train it with the Bradley-Terry
model of preferences, P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)), whose negative log-likelihood
is the pairwise loss of InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, eq. 1):
    L = -log sigmoid(r_w - r_l),
plus, optionally, c * mean((r_w + r_l)^2), which keeps the rewards centred near 0 (Eisenstein et al.
2023, arXiv 2312.09244; TRL's center_rewards_coefficient).
The head and the trunk are saved next to each other: ``reward_head.safetensors`` beside the model files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from corral.posttrain.data import PairSample, TokenBatch, pair_batches

HEAD_FILE = "reward_head.safetensors"
REWARD_JSON = "reward.json"


class RewardModel(nn.Module):
    """trunk (a Transformer) -> hidden state of each row's last real token -> head -> one reward per row."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config  # checkpoints record the shape of what they hold
        device = trunk.norm.weight.device
        self.head = nn.Linear(trunk.config.dim, 1, bias=False, device=device)
        # normal(0, 1/sqrt(dim + 1)), as transformers initialises a sequence-classification score head
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(trunk.config.dim + 1))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) right-padded, lengths (B,) -> rewards (B,) float32."""
        return self.head(_last_hidden(self, TokenBatch(tokens, tokens, lengths.to(tokens.device)))).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """Mean -log sigmoid(r_w - r_l) over pairs, + center * mean((r_w + r_l)^2); chosen, rejected (B,)."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss


def _last_hidden(model: RewardModel, batch: TokenBatch) -> torch.Tensor:
    """Final-norm hidden state (2B, dim) of each row's last real token."""
    h = model.trunk.hidden(batch.tokens)  # (2B, T, dim)
    return h[torch.arange(h.shape[0], device=h.device), batch.lengths - 1].float()


class FeatureCache:
    """Last-token features of a frozen trunk, kept per (dataset key, pair index).

    A frozen trunk gives every pair the same features each epoch, so only the first visit runs it; the
    head then trains on cached (dim,) vectors (a linear probe at the speed of a dot product).
    """

    def __init__(self) -> None:
        self.table: dict[tuple[int, int], torch.Tensor] = {}

    def features(self, model: RewardModel, batch: TokenBatch, key: int) -> torch.Tensor:
        index = batch.index.tolist()
        if any((key, i) not in self.table for i in index):
            with torch.no_grad():
                chosen, rejected = _last_hidden(model, batch).chunk(2)  # (B, dim) each
            for i, c, r in zip(index, chosen, rejected):
                self.table[(key, i)] = torch.stack([c, r])  # (2, dim)
        both = torch.stack([self.table[(key, i)] for i in index])  # (B, 2, dim)
        return torch.cat([both[:, 0], both[:, 1]])  # (2B, dim): chosen rows, then rejected


def pair_rewards(model: RewardModel, batch: TokenBatch, cache: FeatureCache | None = None,
                 key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards (B,), rejected rewards (B,)) of a pair batch (chosen rows first).

    With a cache and a trunk that has nothing to train, the trunk runs once per pair (FeatureCache).
    """
    frozen = not any(p.requires_grad for p in model.trunk.parameters())
    if frozen and cache is not None and batch.index is not None:
        last = cache.features(model, batch, key)
    else:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            last = _last_hidden(model, batch)  # a frozen trunk keeps no activations for backward
    rewards = model.head(last).squeeze(-1)  # (2B,)
    chosen, rejected = rewards.chunk(2)
    return chosen, rejected


def reward_objective(center: float, device: torch.device, cache: FeatureCache | None = None):
    """loss_fn(reward model, pair batch) for corral.train.loop.train_loop."""

    def loss_fn(model: RewardModel, batch: TokenBatch):
        batch = batch.to(device)
        chosen, rejected = pair_rewards(model, batch, cache, key=0)
        diff = (chosen - rejected).detach()
        return bradley_terry_loss(chosen, rejected, center), {
            "tokens": batch.n_tokens, "reward_accuracy": float((diff > 0).float().mean()),
            "reward_margin": float(diff.mean()), "reward_chosen": float(chosen.detach().mean()),
            "reward_rejected": float(rejected.detach().mean())}

    return loss_fn


def reward_evaluate(model: RewardModel, pairs: list[PairSample], batch_size: int, center: float,
                    device: torch.device, cache: FeatureCache | None = None) -> dict[str, float]:
    """Held-out pairwise loss, accuracy (reward of chosen > rejected) and mean margin."""
    was_training = model.training
    model.eval()
    chosen_all, rejected_all = [], []
    with torch.no_grad():
        for batch in pair_batches(pairs, batch_size, 0, cycle=False):
            chosen, rejected = pair_rewards(model, batch.to(device), cache, key=1)
            chosen_all.append(chosen)
            rejected_all.append(rejected)
    model.train(was_training)
    chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
    diff = chosen - rejected
    return {"val_loss": float(bradley_terry_loss(chosen, rejected, center)),
            "reward_accuracy": float((diff > 0).float().mean()), "reward_margin": float(diff.mean())}


def save_reward_head(model: RewardModel, directory: str | Path) -> None:
    """Write the head beside the exported trunk, so ``load_reward_model(directory)`` rebuilds the pair."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file({"head.weight": model.head.weight.detach().float().cpu().contiguous()}, str(directory / HEAD_FILE))
    (directory / REWARD_JSON).write_text(json.dumps({"kind": "reward_model", "head": HEAD_FILE}) + "\n")


def load_reward_model(directory: str | Path, trunk_path: str | Path | None = None,
                      device: torch.device | str = "cpu") -> RewardModel:
    """A reward model written by ``corral finetune`` with objective = "rm" (the trunk and reward_head.safetensors)."""
    from safetensors.torch import load_file

    from corral.errors import ModelNotFoundError
    from corral.train.setup import model_from_file

    directory = Path(directory)
    if not (directory / HEAD_FILE).is_file():
        raise ModelNotFoundError(f"{directory} holds no {HEAD_FILE}: not a reward model written by corral finetune")
    trunk = model_from_file(trunk_path or _trunk_file(directory), torch.device(device))
    model = RewardModel(trunk)
    model.head.weight.data.copy_(load_file(str(directory / HEAD_FILE))["head.weight"])
    return model.eval()


def _trunk_file(directory: Path) -> Path:
    ggufs = sorted(directory.glob("*.gguf"))
    return ggufs[0] if ggufs else directory
