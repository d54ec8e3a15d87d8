"""PPO and rejection sampling on real weights: SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32)
through ``corral finetune`` with the shipped configs, the keyword reward (0.5 for "Here", 0.5 for at most 12
words), the last 4 blocks trained. Figures of full-length runs are in docs/posttrain.md.
"""

from __future__ import annotations

import json

import pytest

from corral.llm import default_model_path
from corral.posttrain.config import load_finetune_config
from corral.posttrain.finetune import run_finetune

pytestmark = pytest.mark.slow


def _events(metrics_path) -> list[dict]:
    return [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r.get("event") == "eval"]


def _config(name: str, out_dir, overrides: list[str]):
    return load_finetune_config(f"configs/finetune/{name}", [f"--model.source={json.dumps(str(default_model_path()))}",
                                                             f"--out_dir={json.dumps(str(out_dir))}",
                                                             "--train.progress=false", "--train.tensorboard=false",
                                                             "--output.dir=" + json.dumps(str(out_dir / "model")),
                                                             *overrides])


@pytest.mark.timeout(1800)  # 8 rollouts + 2 evaluations of a 135M model; over 900 s on a loaded 2-core machine
def test_ppo_raises_held_reward_with_bounded_kl_on_smollm2(tmp_path):
    config = _config("ppo_keyword.toml", tmp_path / "ppo", [])  # 16 steps, 8 rollouts of 16 responses
    result = run_finetune(config)
    before, after = result.eval_before, result.eval_after  # 9 held prompts x 4 samples, the same seeds
    assert after["reward"] > before["reward"], (before, after)
    assert 0 < after["kl"] < 10, after  # nats per response: the policy moved, the penalty held it near the reference
    steps = [r for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "event" not in r]
    assert len(steps) == 16 and all(k in steps[-1] for k in ("reward", "kl", "value_loss", "clip_frac"))
    assert result.model_dir.name == "model.gguf" and result.model_dir.is_file()  # the base was a GGUF: so is the result


@pytest.mark.timeout(1800)
def test_rejection_sampling_raises_greedy_score_round_over_round_on_smollm2(tmp_path):
    config = _config("rs_keyword.toml", tmp_path / "rs", [])
    result = run_finetune(config)
    scores = [e["greedy_score"] for e in _events(result.metrics_path)]
    assert len(scores) == config.rs.rounds + 1  # before training, then after every round
    assert scores[-1] > scores[0] and all(b >= a for a, b in zip(scores, scores[1:])), scores
    rounds = [r for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "event" not in r]
    assert all(r["kept_score"] >= r["sample_score"] for r in rounds)  # best of k beats the average
