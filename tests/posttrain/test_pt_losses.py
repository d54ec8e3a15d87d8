"""DPO, IPO, robust DPO and the reward-model loss against TRL's own trainer code on the same log-probs.

TRL (a test-only peer) computes these losses inside ``DPOTrainer._compute_loss`` and
``RewardTrainer.compute_loss``; both are called unbound here with the trainer's attributes set on a
namespace and a stand-in model whose output is the per-token log-probs (or rewards) Corral computed
for a real batch of a small Transformer, so the two sides see exactly the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from corral.model.config import PRESETS
from corral.posttrain.data import IGNORE_INDEX, PairSample, Sample, pair_batches
from corral.posttrain.preference import PairLogps, dpo_loss, pair_logps
from corral.posttrain.reward import RewardModel, bradley_terry_loss, pair_rewards
from corral.train.setup import fresh_model

trl = pytest.importorskip("trl")
VOCAB = 64


def tiny_model(seed: int):
    config = dataclasses.replace(PRESETS["debug"], dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                 multiple_of=16)
    return fresh_model(config, torch.device("cpu"), seed)


def random_pairs(n: int, seed: int = 0) -> list[PairSample]:
    """Pairs with a shared prompt and completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        sides = []
        for _ in range(2):
            completion = torch.randint(0, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            sides.append(Sample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
        pairs.append(PairSample(*sides))
    return pairs


def corral_batch_logps(seed: int):
    """A pair batch, the policy's per-token log-probs (2B, T) and both models' PairLogps, all from Corral."""
    policy, reference = tiny_model(seed), tiny_model(seed + 1)
    batch = next(pair_batches(random_pairs(6, seed), 6, 0, cycle=False))
    from corral.posttrain.sft import token_logprobs

    with torch.no_grad():
        per_token = token_logprobs(policy, batch)  # (2B, T)
        return batch, per_token, pair_logps(policy, batch), pair_logps(reference, batch)


def trl_dpo_loss(batch, per_token: torch.Tensor, ref: PairLogps, loss_type: str, beta: float,
                 label_smoothing: float = 0.0) -> float:
    """TRL's DPOTrainer._compute_loss on inputs whose model output is Corral's per-token log-probs."""
    # TRL's completion_mask marks completion tokens of input_ids; Corral's targets mark the positions that
    # predict them (shifted by one), so the mask is the targets' mask moved right by one.
    trained = batch.targets != IGNORE_INDEX  # (2B, T)
    completion_mask = torch.zeros_like(trained, dtype=torch.long)
    completion_mask[:, 1:] = trained[:, :-1].long()
    T = batch.tokens.shape[1]
    outputs = SimpleNamespace(log_probs=per_token[:, : T - 1], entropy=torch.zeros(per_token.shape),
                              mean_logits=torch.zeros(per_token.shape), is_top1=torch.zeros(per_token.shape,
                                                                                             dtype=torch.bool))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x))
    inputs = {"input_ids": batch.tokens, "attention_mask": torch.ones_like(batch.tokens),
              "completion_mask": completion_mask, "ref_chosen_logps": ref.chosen, "ref_rejected_logps": ref.rejected}
    return float(trl.DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, False))


@pytest.mark.parametrize(("loss_type", "beta", "eps"), [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0),
                                                         ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0),
                                                         ("robust", 0.1, 0.2)])
def test_dpo_losses_equal_trl_on_the_same_logprobs(loss_type, beta, eps):
    batch, per_token, policy, ref = corral_batch_logps(seed=3)
    assert not torch.equal(policy.chosen, ref.chosen)  # two different models: the log-ratios are not zero
    ours, _, _ = dpo_loss(policy, ref, beta, loss_type, eps)
    theirs = trl_dpo_loss(batch, per_token, ref, loss_type, beta, eps)
    assert abs(float(ours.mean()) - theirs) < 1e-5, (float(ours.mean()), theirs)
    assert float(ours.mean()) > 0


def test_conservative_dpo_equals_the_formula_in_float64():
    """Label smoothing on the sigmoid loss is cDPO (TRL 1.x dropped it from "sigmoid", so the paper's formula)."""
    _, _, policy, ref = corral_batch_logps(seed=4)
    eps, beta = 0.15, 0.3
    ours, _, _ = dpo_loss(policy, ref, beta, "sigmoid", eps)
    d = ((policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)).double()
    expected = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    assert torch.allclose(ours.double(), expected, atol=1e-6)


def test_reward_model_loss_equals_trl_on_the_same_rewards():
    torch.manual_seed(0)
    model = RewardModel(tiny_model(5))
    batch = next(pair_batches(random_pairs(5, 1), 5, 0, cycle=False))
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, batch)
    for center in (0.0, 0.01):
        stub = SimpleNamespace(model=SimpleNamespace(training=True),
                               args=SimpleNamespace(center_rewards_coefficient=center or None),
                               accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
                               _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
        outputs = SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # (2B, 1), chosen first
        inputs = {"input_ids": batch.tokens, "attention_mask": torch.ones_like(batch.tokens)}
        theirs = float(trl.RewardTrainer.compute_loss(stub, lambda _out=outputs, **kwargs: _out, inputs))
        ours = float(bradley_terry_loss(chosen, rejected, center))
        assert abs(ours - theirs) < 1e-5, (center, ours, theirs)


def test_reward_model_reads_the_last_real_token_of_each_padded_row():
    torch.manual_seed(0)
    model = RewardModel(tiny_model(6)).eval()
    pairs = random_pairs(3, 2)
    batch = next(pair_batches(pairs, 3, 0, cycle=False))
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, batch)
        alone = [model(torch.tensor([s.ids]), torch.tensor([len(s.ids)])) for p in pairs for s in (p.chosen,)]
    assert torch.allclose(chosen, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(chosen, rejected)
