"""The [ppo], [rs] and [reward] sections of a finetune config, the prompt files and the keyword reward."""

from __future__ import annotations

import pytest

from corral.errors import ConfigError, DatasetError
from corral.posttrain.config import load_finetune_config
from corral.posttrain.rewards import keyword_reward
from corral.posttrain.rl_config import build_scorer
from corral.posttrain.rl_run import read_prompts


def test_shipped_rl_configs_load_with_their_sections():
    ppo = load_finetune_config("configs/finetune/ppo_keyword.toml")
    assert ppo.objective == "ppo" and ppo.ppo.kl_coef == 0.05 and ppo.reward.keyword == "Here"
    rs = load_finetune_config("configs/finetune/rs_keyword.toml", ["--rs.k=8"])
    assert rs.objective == "rs" and rs.rs.k == 8 and rs.train.steps == rs.rs.rounds * rs.rs.steps_per_round


@pytest.mark.parametrize("override,key", [("--ppo.clip=0", "ppo.clip"), ("--ppo.gamma=1.5", "ppo.gamma"),
                                          ("--rs.k=0", "rs.k"), ("--ppo.minibatches=99", "ppo.minibatches"),
                                          ("--ppo.kl_coeff=0.1", "ppo.kl_coeff")])
def test_bad_rl_config_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_finetune_config("configs/finetune/ppo_keyword.toml", [override])


def test_rs_steps_must_match_rounds_times_steps_per_round():
    with pytest.raises(ConfigError, match="rs.rounds"):
        load_finetune_config("configs/finetune/rs_keyword.toml", ["--train.steps=10"])


def test_unknown_reward_kind_is_an_error_naming_the_choices():
    config = load_finetune_config("configs/finetune/ppo_keyword.toml", ["--reward.kind=magic"])
    with pytest.raises(ConfigError, match="keyword, model"):
        build_scorer(config.reward, None)


def test_prompt_file_splits_train_and_held():
    train, held = read_prompts(["data/posttrain/rl_prompts.jsonl"])
    assert len(train) == 36 and len(held) == 9 and not set(train) & set(held)


@pytest.mark.parametrize("line,field", [('{"prompt": ""}', "prompt"), ('{"text": "hi"}', "prompt"),
                                        ('{"prompt": "hi", "split": "test"}', "split"), ("{not json", None)])
def test_malformed_prompt_row_names_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DatasetError) as err:
        read_prompts([str(path)])
    assert "p.jsonl:2" in str(err.value) and (field is None or err.value.field == field)


def test_keyword_reward_scores_keyword_and_length():
    score = keyword_reward("Here", 5)
    assert score("q", "here is one") == 1.0  # any case, whole word, short
    assert score("q", "Where is it") == 0.5  # "Where" does not contain the word "Here"
    assert score("q", "Here's a long answer with many words in it") == 0.5
    assert score("q", "no keyword and far too many words there, somewhere") == 0.0
    with pytest.raises(ConfigError, match="max_words"):
        keyword_reward("Here", 0)
