"""PPO's math against float64 references written straight from the papers (loops over plain floats).

GAE: Schulman et al. 2015 (arXiv 1506.02438) eq. 16, A_t = sum_l (gamma lambda)^l delta_{t+l}, summed
directly instead of by the backward recursion the library uses. Clipped surrogate: Schulman et al. 2017
(arXiv 1707.06347) eq. 7. Clipped value loss: the PPO2 baselines form. KL: the k1 estimator.
"""

from __future__ import annotations

import math

import pytest
import torch

from corral.posttrain.ppo import gae_advantages, kl_penalty, ppo_policy_loss, ppo_value_loss, whiten

B, T = 4, 11
SPANS = [(0, 11), (2, 9), (5, 6), (3, 11)]  # [start, stop) of each row's response


def _mask() -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, stop) in enumerate(SPANS):
        mask[b, start:stop] = True
    return mask


def reference_gae(rewards, values, gamma, lam):
    """Per row: delta_t over the response, V past its end = 0, A_t = sum_{l>=0} (gamma lam)^l delta_{t+l}."""
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b, (start, stop) in enumerate(SPANS):
        r = [float(x) for x in rewards[b]]
        v = [float(x) for x in values[b]]
        delta = {t: r[t] + gamma * (v[t + 1] if t + 1 < stop else 0.0) - v[t] for t in range(start, stop)}
        for t in range(start, stop):
            adv[b][t] = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, stop))
            ret[b][t] = adv[b][t] + v[t]
    return adv, ret


def reference_policy_loss(logp, old_logp, adv, clip):
    terms, clipped = [], 0
    for b, (start, stop) in enumerate(SPANS):
        for t in range(start, stop):
            ratio = math.exp(float(logp[b, t]) - float(old_logp[b, t]))
            a = float(adv[b, t])
            terms.append(min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a))
            clipped += abs(ratio - 1) > clip
    return -sum(terms) / len(terms), clipped / len(terms)


def reference_value_loss(values, old_values, returns, c):
    terms = []
    for b, (start, stop) in enumerate(SPANS):
        for t in range(start, stop):
            v, vo, r = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            v_clip = vo + min(max(v - vo, -c), c)
            terms.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_equals_paper_sum_float64(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g,
                                                                                       dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, _mask(), gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, gamma, lam)
    assert torch.allclose(adv, torch.tensor(ref_adv, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(ret, torch.tensor(ref_ret, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gae_with_lambda_one_and_zero_values_is_the_reward_to_go():
    rewards = torch.zeros(1, 4, dtype=torch.float64)
    rewards[0, 3] = 1.0
    adv, _ = gae_advantages(rewards, torch.zeros_like(rewards), torch.ones(1, 4, dtype=torch.bool), 0.5, 1.0)
    assert adv.tolist() == [[0.125, 0.25, 0.5, 1.0]]


@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_ppo_policy_loss_equals_paper_eq7_float64(clip):
    g = torch.Generator().manual_seed(2)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    loss, frac = ppo_policy_loss(logp, old, adv, _mask(), clip)
    ref_loss, ref_frac = reference_policy_loss(logp, old, adv, clip)
    assert 0 < ref_frac < 1  # the batch exercises both branches
    assert abs(loss.item() - ref_loss) < 1e-12 and abs(frac.item() - ref_frac) < 1e-12


def test_ppo_policy_loss_gradient_vanishes_where_the_ratio_is_clipped():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[0.5, 0.5]], dtype=torch.float64, requires_grad=True)  # ratio e^0.5 > 1.2
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = ppo_policy_loss(logp, old, adv, torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    # A > 0 and ratio above 1 + eps: clipped, no gradient. A < 0: the unclipped (pessimistic) term still pulls.
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == pytest.approx(math.exp(0.5) / 2)


def test_ppo_value_loss_equals_clipped_form_float64():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    loss = ppo_value_loss(values, old, returns, _mask(), 0.2)
    assert abs(loss.item() - reference_value_loss(values, old, returns, 0.2)) < 1e-12


def test_kl_penalty_is_minus_coef_times_log_ratio():
    logp, ref = torch.tensor([[-1.0, -2.0]], dtype=torch.float64), torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    assert kl_penalty(logp, ref, 0.1)[0].tolist() == pytest.approx([-0.05, 0.1])


def test_whiten_gives_zero_mean_unit_variance_over_the_mask_only():
    g = torch.Generator().manual_seed(4)
    x = 5 + 3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _mask()
    w = whiten(x, mask)
    vals = w[mask]
    assert abs(vals.mean().item()) < 1e-12 and abs((vals ** 2).mean().item() - 1) < 1e-6
    assert (w[~mask] == 0).all()
