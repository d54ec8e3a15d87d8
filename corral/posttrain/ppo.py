"""PPO for RLHF as InstructGPT and Llama 3 ran it: an actor with a value head, a KL penalty to a frozen reference.

The math is four small pure functions over per-token tensors (B, T) of the sampled responses, each next to
its paper; ``ppo_loss`` is the ``loss_fn`` the one training loop (corral.train.loop) runs, on batches the
rollout source (corral.posttrain.rollout) makes with Corral's engine. Positions are target positions: entry
t scores the token at t + 1 given tokens 0..t, and ``mask`` (B, T) is True on the response's tokens only
(the prompt and the right padding are False).

Per rollout (computed once, with the weights that sampled it):
  kl_t   = log pi_old(y_t) - log pi_ref(y_t)                       k1 estimator of KL(pi_old || pi_ref)
  r_t    = -kl_coef * kl_t  (+ the reward model's / program's score on the last response token)
  A_t    = GAE(r, V_old; gamma, lambda), whitened;  R_t = A_t + V_old_t (the value target)
Per optimizer step (the current weights):
  rho_t  = exp(log pi(y_t) - log pi_old(y_t))
  L      = -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A)  +  vf_coef * 0.5 mean max((V - R)^2, (V_clip - R)^2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from corral.posttrain.rl_config import PPOConfig
from corral.train.loss import linear_logprobs, output_weight


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (both (B, T)); 0 when mask is empty."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward -kl_coef * (log pi(y_t) - log pi_ref(y_t)), (B, T).

    The k1 estimator of KL(pi || pi_ref) (Schulman 2020, "Approximating KL divergence"): unbiased per sampled
    token; summed over a response it is the sequence log-ratio that InstructGPT subtracts from the reward,
    R(x, y) = r(x, y) - beta log(pi_RL(y|x) / pi_SFT(y|x)) (Ouyang et al. 2022, arXiv 2203.02155, eq. 2),
    spread per token as in Ziegler et al. 2019 (arXiv 1909.08593).
    """
    return -kl_coef * (logp - ref_logp)


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16): (advantages, returns).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_l (gamma lambda)^l delta_{t+l}, computed backwards as
    A_t = delta_t + gamma lambda A_{t+1}. A response ends its episode: past its last token V = 0 and A = 0
    (mask False resets the recursion). rewards, values (B, T) float; mask (B, T) bool. returns = A + V,
    the value function's regression target.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(B)  # (B,) V_{t+1}
    next_adv = rewards.new_zeros(B)  # (B,) A_{t+1}
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        live = mask[:, t]
        advantages[:, t] = torch.where(live, adv, 0.0)
        next_value = torch.where(live, values[:, t], 0.0)
        next_adv = advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x shifted and scaled to mean 0, variance 1 over the masked entries (PPO's advantage normalisation)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate objective (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss to minimise.

    L = -E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)], rho_t = pi(y_t) / pi_old(y_t), averaged
    over the response tokens. Returns (loss, clip fraction: the share of tokens whose ratio left [1-eps, 1+eps]).
    """
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_frac = masked_mean(((ratio - 1.0).abs() > clip).to(ratio.dtype), mask)
    return loss, clip_frac.detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   value_clip: float) -> torch.Tensor:
    """Clipped value loss 0.5 E_t[max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)].

    The value function may move at most c from the values the rollout saw before the loss stops pulling
    (the PPO2 baselines implementation of arXiv 1707.06347, kept by InstructGPT's and Llama 3's RLHF code).
    """
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# --- the actor-critic and the loss_fn ------------------------------------------------------------


class ActorCritic(nn.Module):
    """The policy Transformer and a scalar value head on its trunk (``Transformer.hidden``).

    The value head shares the trunk, so one forward gives both the token log-probs and V(s_t). It starts at
    zero, so the first advantages are the discounted rewards themselves. ``config`` is the policy's, so the
    training loop's checkpoints record the model shape.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.dim, 1, bias=True)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, targets (B, T) -> (log pi(targets) (B, T), V (B, T)), both float32."""
        h = self.policy.hidden(tokens)  # (B, T, dim)
        logp = linear_logprobs(h, output_weight(self.policy), targets)  # (B, T)
        values = self.value_head(h.float()).squeeze(-1)  # (B, T)
        return logp, values


@dataclass
class PPOBatch:
    """One minibatch of a rollout, every tensor (B, T) on the training device except ``scores`` (B,)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    """Token ids the position predicts; IGNORE_INDEX outside the response."""
    mask: torch.Tensor
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    """Whitened over the whole rollout."""
    returns: torch.Tensor
    kl: torch.Tensor
    """Per-token k1 estimate log pi_old - log pi_ref (0 outside the response)."""
    scores: torch.Tensor
    """The reward's score of each response, before the KL penalty."""


def ppo_loss(model: ActorCritic, batch: PPOBatch, params: PPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """loss_fn for corral.train.loop.train_loop: policy loss + vf_coef * value loss (clip, value_clip, vf_coef
    of the [ppo] section), and the run's metrics."""
    logp, values = model(batch.tokens, batch.targets)  # (B, T) each, current weights
    policy_loss, clip_frac = ppo_policy_loss(logp, batch.old_logp, batch.advantages, batch.mask, params.clip)
    value_loss = ppo_value_loss(values, batch.old_values, batch.returns, batch.mask, params.value_clip)
    loss = policy_loss + params.vf_coef * value_loss
    with torch.no_grad():
        approx_kl_old = masked_mean(batch.old_logp - logp, batch.mask)  # drift since the rollout (k1)
    metrics = {
        "tokens": int(batch.mask.sum()),
        "reward": float(batch.scores.mean()),
        "kl": float((batch.kl * batch.mask).sum(1).mean()),  # per response, summed over its tokens
        "policy_loss": float(policy_loss.detach()),
        "value_loss": float(value_loss.detach()),
        "clip_frac": float(clip_frac),
        "approx_kl_old": float(approx_kl_old),
        "response_len": float(batch.mask.sum(1).float().mean()),
    }
    return loss, metrics
