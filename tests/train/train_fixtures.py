"""Shared pieces of the pretraining tests: synthetic token shards and a tiny fp32 CPU config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from corral.data.shards import write_shard
from corral.train.config import PretrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128


def write_tiny_data(directory: Path) -> tuple[Path, Path]:
    """A learnable token stream (shifted copies of one pattern) as train and validation shards."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB, size=48)
    tokens = np.concatenate([np.roll(pattern, i % 5) for i in range(120)])  # 5,760 tokens
    return write_shard(directory / "train.bin", tokens), write_shard(directory / "val.bin", tokens[:2000])


def tiny_overrides(out_dir: Path, data_dir: Path, steps: int = 8, **extra) -> list[str]:
    """Overrides that turn the defaults into a 2-layer dim-32 model over the synthetic shards."""
    train, val = data_dir / "train.bin", data_dir / "val.bin"
    values = {
        "out_dir": str(out_dir), "model.preset": "debug", "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.vocab_size": VOCAB, "model.multiple_of": 16, "model.max_seq_len": 64,
        "data.train": [str(train)], "data.val": [str(val)], "data.seq_len": 16, "data.batch_size": 4,
        "train.steps": steps, "train.threads": 1, "train.progress": False, "train.tensorboard": False,
        "train.val_every": 0, "optim.warmup_steps": 2, "optim.lr": 3e-3, "checkpoint.every": 0,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--{k}={json.dumps(v)}" for k, v in values.items()]


def tiny_config(out_dir: Path, data_dir: Path, steps: int = 8, **extra) -> PretrainConfig:
    return load_config(None, tiny_overrides(out_dir, data_dir, steps, **extra))


def pretrain_command(overrides: list[str], *args: str) -> list[str]:
    return [sys.executable, "-m", "corral.train.pretrain", "-", *overrides, *args]


def run_pretrain_process(overrides: list[str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(pretrain_command(overrides, *args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
