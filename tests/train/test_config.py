"""Typed pretraining config: TOML in, dataclasses out, unknown keys and bad types named."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from corral.errors import ConfigError
from corral.train import config as cfg
from corral.train.config import load_config

REPO_CONFIGS = cfg.Path(__file__).resolve().parents[2] / "configs" / "pretrain"


def test_load_config_reads_toml_sections_and_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('out_dir = "r"\n[model]\npreset = "debug"\ndim = 64\n[optim]\nlr = 1e-3\n')
    config = load_config(path)
    assert config.out_dir == "r"
    assert config.model.dim == 64 and config.model.n_layers == 4  # the rest from the preset
    assert config.optim.lr == 1e-3


def test_unknown_key_is_config_error_naming_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path)


@pytest.mark.parametrize("override, key", [("--train.steps=ten", "train.steps"), ("--optim.lr=true", "optim.lr"),
                                           ("--model.dim=1.5", "model.dim"), ("--bogus=1", "bogus")])
def test_bad_override_is_config_error_naming_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_dotted_overrides_parse_toml_values():
    config = load_config(None, ["--optim.lr=3e-4", "--data.train=[\"a.txt\", \"b\"]", "--checkpoint.resume=auto",
                                "--train.compile=true", "--model.preset=debug", "--model.n_layers=2"])
    assert config.optim.lr == 3e-4
    assert config.data.train == ["a.txt", "b"]
    assert config.checkpoint.resume == "auto"  # a bare word is a string
    assert config.train.compile is True
    assert config.model.n_layers == 2


def test_invalid_choice_is_config_error():
    with pytest.raises(ConfigError, match="failure.nan_policy"):
        load_config(None, ["--failure.nan_policy=ignore"])


def test_every_field_has_a_docstring():
    for section in (cfg.DataConfig, cfg.OptimConfig, cfg.TrainConfig, cfg.CheckpointConfig, cfg.ParallelConfig,
                    cfg.FailureConfig, cfg.FaultConfig):
        source = inspect.getsource(section)
        for f in dataclasses.fields(section):
            after = source.split(f"    {f.name}:", 1)[1].split("\n", 2)[1]
            assert after.strip().startswith('"""'), f"{section.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize("name", ["debug.toml", "llama3-8b.toml"])
def test_shipped_configs_load(name):
    config = load_config(REPO_CONFIGS / name)
    assert config.train.steps > 0
