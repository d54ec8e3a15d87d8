"""Direct preference optimization and its variants, on sequence log-probs from corral.train.loss.

For a pair (x, y_w preferred, y_l rejected), a policy pi and a frozen reference pi_ref, with the
log-ratios  h_w = log pi(y_w|x) - log pi_ref(y_w|x)  and  h_l = log pi(y_l|x) - log pi_ref(y_l|x):
 - DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7):  L = -log sigmoid(beta (h_w - h_l));
 - conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): labels flipped with
   probability eps,  L = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d),  d = h_w - h_l;
 - robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 8): the unbiased estimate under flips,
   L = [-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)] / (1 - 2 eps);
 - IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): a squared loss that keeps the log-ratio gap at
   1 / (2 tau) instead of pushing it to infinity,  L = (d' - 1 / (2 beta))^2,  with d' the gap of the
   per-token average log-ratios (TRL's normalization, confirmed with the IPO authors).
The implicit reward of a completion is beta h (DPO section 5); "reward accuracy" is how often the
chosen one's is higher, and the "margin" is their mean difference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from corral.posttrain.data import IGNORE_INDEX, PairSample, TokenBatch, pair_batches
from corral.posttrain.sft import token_logprobs


@dataclass
class PairLogps:
    """Summed completion log-probs and completion lengths of B pairs: each (B,) float32 / long."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_logps(model: nn.Module, batch: TokenBatch) -> PairLogps:
    """A pair batch (chosen rows, then rejected rows) -> per-sequence log p(completion | prompt)."""
    logp = token_logprobs(model, batch)  # (2B, T), 0 on prompt and padding
    sums = logp.sum(dim=1)  # (2B,)
    counts = (batch.targets != IGNORE_INDEX).sum(dim=1)  # (2B,)
    chosen, rejected = sums.chunk(2)
    chosen_tokens, rejected_tokens = counts.chunk(2)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


def dpo_loss(policy: PairLogps, reference: PairLogps, beta: float, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss (B,), chosen implicit rewards (B,), rejected implicit rewards (B,)); see the module docstring."""
    chosen_ratio = policy.chosen - reference.chosen  # h_w (B,)
    rejected_ratio = policy.rejected - reference.rejected  # h_l (B,)
    d = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    elif loss == "ipo":
        d_avg = (chosen_ratio / policy.chosen_tokens.clamp(min=1)
                 - rejected_ratio / policy.rejected_tokens.clamp(min=1))
        losses = (d_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}")  # the config already refused it
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Accuracy (a tie counts half: the reference's implicit rewards are all 0), margin and both means."""
    diff = chosen_rewards - rejected_rewards
    accuracy = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
    return {"reward_accuracy": float(accuracy), "reward_margin": float(diff.mean()),
            "reward_chosen": float(chosen_rewards.mean()), "reward_rejected": float(rejected_rewards.mean())}


class Reference:
    """The frozen starting policy's log-probs: precomputed once per pair, or a frozen copy scoring each batch."""

    def __init__(self, model: nn.Module, mode: str):
        self.mode = mode
        self.table: dict[tuple[int, int], tuple[float, float]] = {}  # (dataset key, pair index) -> (chosen, rejected)
        self.model = copy.deepcopy(model).eval().requires_grad_(False) if mode == "online" else None

    def precompute(self, model: nn.Module, pairs: list[PairSample], batch_size: int, device: torch.device,
                   key: int = 0) -> None:
        """Score every pair with ``model`` as it is now (before training), in order; key separates datasets."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in pair_batches(pairs, batch_size, 0, cycle=False):
                logps = pair_logps(model, batch.to(device))
                for i, c, r in zip(batch.index.tolist(), logps.chosen.tolist(), logps.rejected.tolist()):
                    self.table[(key, i)] = (c, r)
        model.train(was_training)

    def logps(self, batch: TokenBatch, key: int = 0) -> PairLogps:
        """The reference's log-probs of a pair batch (its ``index`` names the pairs for a precomputed table)."""
        if self.model is not None:
            with torch.no_grad():
                return pair_logps(self.model, batch)
        values = torch.tensor([self.table[(key, int(i))] for i in batch.index], device=batch.tokens.device)  # (B, 2)
        counts = (batch.targets != IGNORE_INDEX).sum(dim=1).chunk(2)
        return PairLogps(values[:, 0], values[:, 1], *counts)


def dpo_objective(reference: Reference, beta: float, loss: str, label_smoothing: float, device: torch.device):
    """loss_fn(model, pair batch) for corral.train.loop.train_loop, with the reward metrics it logs."""

    def loss_fn(model: nn.Module, batch: TokenBatch):
        batch = batch.to(device)
        policy = pair_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy, reference.logps(batch), beta, loss,
                                                            label_smoothing)
        metrics = {"tokens": batch.n_tokens, **reward_metrics(chosen_rewards, rejected_rewards),
                   "logp_chosen": float(policy.chosen.detach().mean()),
                   "logp_rejected": float(policy.rejected.detach().mean())}
        return losses.mean(), metrics

    return loss_fn


def dpo_evaluate(model: nn.Module, reference: Reference, pairs: list[PairSample], batch_size: int, beta: float,
                 loss: str, label_smoothing: float, device: torch.device, key: int = 1) -> dict[str, float]:
    """Held-out loss, implicit-reward accuracy and margin, and the log-likelihood preference accuracy of both
    the policy and the reference (how often log p(chosen) > log p(rejected))."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"loss": [], "chosen": [], "rejected": [], "policy": [], "ref": []}
    with torch.no_grad():
        for batch in pair_batches(pairs, batch_size, 0, cycle=False):
            batch = batch.to(device)
            policy, ref = pair_logps(model, batch), reference.logps(batch, key)
            losses, chosen_r, rejected_r = dpo_loss(policy, ref, beta, loss, label_smoothing)
            for name, value in (("loss", losses), ("chosen", chosen_r), ("rejected", rejected_r),
                                ("policy", (policy.chosen > policy.rejected).float()),
                                ("ref", (ref.chosen > ref.rejected).float())):
                parts[name].append(value)
    model.train(was_training)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return {"val_loss": float(cat["loss"].mean()), **reward_metrics(cat["chosen"], cat["rejected"]),
            "logp_accuracy": float(cat["policy"].mean()), "ref_logp_accuracy": float(cat["ref"].mean())}
