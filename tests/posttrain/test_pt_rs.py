"""Rejection sampling through the one training loop, on the toy of test_pt_ppo_loop (16 letters, reward: the
share of 'c'): the greedy score on held prompts rises round over round."""

from __future__ import annotations

import pytest
import torch
from test_pt_ppo_loop import HELD, HELD_TEXTS, PROMPTS, STOP, TEXTS, Letters, share_of_c

from corral.posttrain.rejection import best_of_k, build_rejection_source, greedy_score, rs_sft_loss
from corral.posttrain.rl_config import RSConfig
from corral.posttrain.rollout import Sample
from corral.train.config import load_config
from corral.train.loop import read_metrics, train_loop
from corral.train.run import Run
from corral.train.setup import build_optim, fresh_model, start_processes


def rs_run(out_dir, steps: int, val_every: int) -> Run:
    values = {"out_dir": f'"{out_dir}"', "model.preset": '"debug"', "model.dim": 32, "model.n_layers": 2,
              "model.n_heads": 4, "model.n_kv_heads": 2, "model.vocab_size": 16, "model.multiple_of": 16,
              "train.steps": steps, "train.threads": 1, "train.progress": "false", "train.tensorboard": "false",
              "train.val_every": val_every, "optim.warmup_steps": 1, "optim.lr": 1e-2, "optim.weight_decay": 0.0,
              "optim.min_lr_ratio": 1.0}
    config = load_config(None, [f"--{k}={v}" for k, v in values.items()])
    procs = start_processes(config)
    model = fresh_model(config.model, procs.device, config.train.seed)
    optimizer, scheduler = build_optim(model, config, None)
    return Run(config=config, model=model, optimizer=optimizer, scheduler=scheduler, device=procs.device)


def test_best_of_k_keeps_each_prompts_top_scored_sample():
    samples = [Sample([1], [i], str(i), True) for i in range(6)]
    kept, best = best_of_k(samples, torch.tensor([0.1, 0.9, 0.3, 0.5, 0.5, 0.2]), 3)
    assert [s.text for s in kept] == ["1", "3"] and best == pytest.approx([0.9, 0.5])


def test_rejection_sampling_raises_greedy_score_round_over_round(tmp_path):
    params = RSConfig(k=8, rounds=4, prompts_per_round=6, steps_per_round=5, batch_size=6, max_new_tokens=8)
    run = rs_run(tmp_path / "run", steps=params.rounds * params.steps_per_round, val_every=params.steps_per_round)
    source = build_rejection_source(run.model, Letters(), {STOP}, PROMPTS, TEXTS, share_of_c, params)
    scores = []

    def evaluate():  # the loop calls it after every round (train.val_every = steps_per_round)
        scores.append(greedy_score(source.engine, HELD, HELD_TEXTS, share_of_c, params.max_new_tokens))

    evaluate()
    result = train_loop(run, source, rs_sft_loss, evaluate=evaluate, name="rs")
    assert len(source.history) == params.rounds and len(scores) == params.rounds + 1
    assert scores[-1] > scores[0] + 0.3 and scores[-1] >= max(scores[:-1]), scores
    assert all(r["kept_score"] >= r["sample_score"] for r in source.history)  # best-of-k beats the average
    records = read_metrics(result.metrics_path)
    assert records[params.steps_per_round * params.rounds]["round"] == params.rounds
