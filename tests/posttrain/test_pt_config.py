"""FinetuneConfig: strict TOML, dotted overrides, value checks, and the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corral.errors import ConfigError, ModelNotFoundError
from corral.posttrain.config import load_finetune_config
from corral.posttrain.finetune import resolve_source

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["sft", "rm", "dpo"])
def test_shipped_configs_load(name):
    config = load_finetune_config(REPO / "configs" / "finetune" / f"{name}.toml")
    assert config.objective == name and config.data.train


def test_a_table_keeps_finetuning_defaults_for_keys_it_leaves_out(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('objective = "dpo"\n[optim]\nlr = 1e-4\n')
    config = load_finetune_config(path, ["--preference.beta=0.3", "--train.steps=7"])
    assert config.optim.lr == 1e-4 and config.optim.weight_decay == 0.0  # not pretraining's 0.1
    assert config.preference.beta == 0.3 and config.train.steps == 7


@pytest.mark.parametrize(("override", "message"), [
    ("--preference.bta=0.1", "unknown finetune config key 'preference.bta'"),
    ("--objective=ppx", "objective must be one of"),
    ("--preference.loss=hinge", "preference.loss must be one of"),
    ("--preference.label_smoothing=0.5", "label_smoothing must be in"),
    ("--data.batch_size=0", "data.batch_size must be positive"),
    ("--lora.enabled=true --lora.rank=0", "lora.rank must be positive"),
    ("--lora.enabled=true --lora.alpha=-1", "lora.alpha must be positive"),
    ("--objective=dpo --data.pack=true", "data.pack is for objective"),
    ("--data.max_len=abc", "data.max_len must be int"),
])
def test_bad_values_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_finetune_config(None, override.split())


def test_cli_reports_bad_input_in_one_line():
    done = subprocess.run([sys.executable, "-m", "corral", "finetune", "-", "--train.stepz=3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "unknown finetune config key 'train.stepz'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_missing_model_source_is_a_typed_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a path nor a stored model"):
        resolve_source(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="model.source is empty"):
        resolve_source("")
