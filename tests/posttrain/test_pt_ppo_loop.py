"""PPO through the one training loop on a toy: a small random model over 16 letters learns to say 'c'.

The machinery is all real (engine rollouts, recomputed log-probs, GAE, the clipped losses, train_loop's
checkpoints); only the model and its 16-letter vocabulary are toys, so the test runs in seconds.
"""

from __future__ import annotations

import pytest
import torch

from corral.engine.engine import Engine
from corral.posttrain.ppo import ActorCritic, ppo_loss
from corral.posttrain.rl_config import PPOConfig
from corral.posttrain.rollout import build_rollout_source, evaluate_policy, sample_responses
from corral.train.config import load_config
from corral.train.loop import read_metrics, train_loop
from corral.train.run import Run
from corral.train.setup import build_optim, fresh_model, start_processes

VOCAB, STOP = 16, 15


class Letters:
    """Token i is the letter chr(97 + i); token 15 ends a turn."""

    eos_id = STOP

    def decode_bytes(self, ids):
        return bytes(97 + i for i in ids if i != STOP)


def share_of_c(prompt: str, response: str) -> float:
    return response.count("c") / max(len(response), 1)


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14], [0, 1]]
TEXTS = ["bcd", "ef", "ghij", "kl", "mno", "ab"]
HELD = [[2, 4, 6], [9, 8], [13, 3, 1]]
HELD_TEXTS = ["ceg", "ji", "ndb"]


def ppo_run(out_dir, steps: int, **overrides) -> Run:
    values = {"out_dir": f'"{out_dir}"', "model.preset": '"debug"', "model.dim": 32, "model.n_layers": 2,
              "model.n_heads": 4, "model.n_kv_heads": 2, "model.vocab_size": VOCAB, "model.multiple_of": 16,
              "train.steps": steps, "train.threads": 1, "train.progress": "false", "train.tensorboard": "false",
              "optim.warmup_steps": 1, "optim.lr": 1e-2, "optim.weight_decay": 0.0, **overrides}
    config = load_config(None, [f"--{k}={v}" for k, v in values.items()])
    procs = start_processes(config)
    actor = ActorCritic(fresh_model(config.model, procs.device, config.train.seed))
    optimizer, scheduler = build_optim(actor, config, None)
    return Run(config=config, model=actor, optimizer=optimizer, scheduler=scheduler, device=procs.device)


PARAMS = PPOConfig(prompts_per_rollout=4, samples_per_prompt=4, max_new_tokens=8, kl_coef=0.01, epochs=2,
                   minibatches=2)


def test_ppo_raises_reward_on_held_prompts_with_bounded_kl(tmp_path):
    run = ppo_run(tmp_path / "run", steps=40)
    source = build_rollout_source(run.model, Letters(), {STOP}, PROMPTS, TEXTS, share_of_c, PARAMS)
    before = evaluate_policy(source, HELD, HELD_TEXTS, samples=8)
    result = train_loop(run, source, lambda m, b: ppo_loss(m, b, PARAMS), name="ppo")
    after = evaluate_policy(source, HELD, HELD_TEXTS, samples=8)
    assert before["reward"] < 0.2 and after["reward"] > before["reward"] + 0.3, (before, after)
    assert 0 < after["kl"] < 20, after  # the policy moved, and the penalty kept it within bounds
    records = read_metrics(result.metrics_path)
    assert sorted(records) == list(range(1, 41))
    for key in ("reward", "kl", "value_loss", "clip_frac", "policy_loss"):
        assert key in records[40], key
    # Epoch 1, first minibatch: the rollout's log-probs were recomputed by these very weights, so rho = 1.
    assert records[1]["clip_frac"] == 0.0 and abs(records[1]["approx_kl_old"]) < 1e-5
    assert any(records[s]["clip_frac"] > 0 for s in records)  # later minibatches reuse a stale rollout


def test_rollout_samples_from_current_weights_after_an_update(tmp_path):
    run = ppo_run(tmp_path / "run", steps=1)
    source = build_rollout_source(run.model, Letters(), {STOP}, PROMPTS, TEXTS, share_of_c, PARAMS)
    source.rollout()  # fills the engine's prefix cache with the prompts' keys and values
    with torch.no_grad():
        for p in run.model.policy.parameters():  # what an optimizer step does
            p.add_(0.5 * torch.randn_like(p))
    greedy = sample_responses(source.engine, PROMPTS[:4], 1, 8, seed=0, temperature=0.0)
    fresh = Engine(run.model.policy, Letters(), stop_ids={STOP}, max_batch_size=16)
    expected = sample_responses(fresh, PROMPTS[:4], 1, 8, seed=0, temperature=0.0)
    # Without clear_prefix_cache in rollout(), the next rollout would reuse keys computed by the old weights.
    source.rollout()
    after = sample_responses(source.engine, PROMPTS[:4], 1, 8, seed=0, temperature=0.0)
    assert [s.response for s in after] == [s.response for s in expected]
    assert len(greedy) == 4


def test_rollout_batch_masks_the_response_and_ends_with_the_score(tmp_path):
    run = ppo_run(tmp_path / "run", steps=1)
    params = PPOConfig(prompts_per_rollout=2, samples_per_prompt=2, max_new_tokens=5, kl_coef=0.0, gamma=1.0,
                           lam=1.0, minibatches=1)
    source = build_rollout_source(run.model, Letters(), {STOP}, PROMPTS, TEXTS, lambda p, r: 1.0, params)
    (batch,) = source.rollout()
    lengths = batch.mask.sum(1)
    assert ((lengths >= 1) & (lengths <= 6)).all()  # up to 5 sampled + the stop token
    # kl_coef 0, gamma = lambda = 1: every response token's return is the score, 1.
    assert torch.allclose(batch.returns[batch.mask], torch.ones(int(lengths.sum())), atol=1e-6)
    assert (batch.targets[~batch.mask] == -100).all()


def test_ppo_crash_then_resume_equals_straight_run(tmp_path):
    """RELIABILITY 30 for PPO: checkpoints on rollout boundaries (epochs * minibatches = 4 steps) resume exactly."""
    from corral.train.failure import InjectedCrash

    def train(out, **overrides):
        run = ppo_run(tmp_path / out, steps=8, **{"checkpoint.every": 4, **overrides})
        source = build_rollout_source(run.model, Letters(), {STOP}, PROMPTS, TEXTS, share_of_c, PARAMS)
        return train_loop(run, source, lambda m, b: ppo_loss(m, b, PARAMS), name="ppo")

    straight = train("a")
    with pytest.raises(InjectedCrash, match="step 6"):
        train("b", **{"fault.crash_at_step": 6})
    resumed = train("b", **{"checkpoint.resume": '"auto"'})
    a, b = read_metrics(straight.metrics_path), read_metrics(resumed.metrics_path)
    assert list(a) == list(b) == list(range(1, 9))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b] and a[8]["reward"] == b[8]["reward"]
