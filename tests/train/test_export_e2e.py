"""Pretrain on real text with the Llama 3 tokenizer, export, and generate through `corral generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_fixtures import REPO

from corral.checkpoint.load import load_checkpoint
from corral.cli import main
from corral.train.config import load_config
from corral.train.pretrain import run_pretrain


@pytest.mark.slow
def test_debug_style_run_exports_and_generates(tmp_path):
    text = (REPO / "data" / "corpus" / "tinyshakespeare.txt").read_text()[:20000]
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[-4000:])
    config = load_config(REPO / "configs" / "pretrain" / "debug.toml", [
        f"--out_dir={json.dumps(str(tmp_path / 'run'))}", f"--data.train=[{json.dumps(str(tmp_path / 'train.txt'))}]",
        f"--data.val=[{json.dumps(str(tmp_path / 'val.txt'))}]", "--model.dim=32", "--model.n_layers=2",
        "--data.seq_len=32", "--data.batch_size=2", "--train.steps=3", "--train.val_every=0", "--train.val_batches=1",
        "--checkpoint.every=0", "--train.progress=false", "--train.tensorboard=false"])
    result = run_pretrain(config)
    assert result.steps == 3 and result.final_val_loss is not None
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for fmt, out in (("meta", tmp_path / "meta"), ("hf", tmp_path / "hf"), ("gguf", tmp_path / "model.gguf")):
        assert main(["export", str(tmp_path / "run"), str(out), "--format", fmt]) == 0
        ckpt = load_checkpoint(out)
        assert ckpt.format == fmt and ckpt.config.dim == 32 and ckpt.config.vocab_size == 128256
    # The whole path a user takes: the exported directory through the CLI (one format; each load costs seconds).
    done = subprocess.run([sys.executable, "-m", "corral", "generate", str(tmp_path / "meta"), "ROMEO:",
                           "--max-tokens", "4", "--temperature", "0"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout.strip()) > len("ROMEO:")
