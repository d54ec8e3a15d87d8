"""Weighted mixing into token shards, and `corral pretrain` training on them directly."""

from __future__ import annotations

import json
from pathlib import Path

from corral.data.mix import MixConfig, MixSource, repeats, write_mix
from corral.data.shards import read_shard
from corral.tokenizer import load_llama3_tokenizer

ROOT = Path(__file__).parents[2]
MIX = ROOT / "data/web/messy_mix.jsonl"


def test_repeats_follow_the_weight():
    assert [repeats(2.0, u) for u in (0.0, 0.99)] == [2, 2]
    assert [repeats(0.5, u) for u in (0.2, 0.7)] == [1, 0]
    assert repeats(0.0, 0.0) == 0


def test_weights_up_and_downsample_and_validation_is_held_out(tmp_path):
    tok = load_llama3_tokenizer()
    half = tmp_path / "half.jsonl"
    half.write_bytes(b"".join(MIX.read_bytes().splitlines(keepends=True)[:100]))
    config = MixConfig(out_dir=str(tmp_path / "mix"), val_fraction=0.1, shard_tokens=20_000, sources=[
        MixSource("up", [str(half)], 2.0), MixSource("down", [str(half)], 0.5)])
    manifest = write_mix(config, tok)
    up, down = manifest["sources"]["up"], manifest["sources"]["down"]
    train_docs = up["train_copies"] // 2
    assert 80 <= train_docs <= 98  # ~10% held out
    assert 0.3 * train_docs < down["train_copies"] < 0.7 * train_docs
    total = sum(len(read_shard(tmp_path / "mix" / s)) for s in manifest["train_shards"])
    assert total == up["train_tokens"] + down["train_tokens"] and len(manifest["train_shards"]) > 1
    val = read_shard(tmp_path / "mix/val/up.bin")
    assert len(val) == up["val_tokens"] and val[0] == tok.bos_id


def test_pretrain_trains_on_mixed_shards(tmp_path):
    from corral.train.config import load_config
    from corral.train.pretrain import run_pretrain

    config = MixConfig(out_dir=str(tmp_path / "mix"), val_fraction=0.2, sources=[MixSource("web", [str(MIX)], 1.0)])
    write_mix(config)
    overrides = {"out_dir": str(tmp_path / "run"), "model.preset": "debug", "model.dim": 32, "model.n_layers": 1,
                 "model.n_heads": 2, "model.n_kv_heads": 1, "model.multiple_of": 16, "model.max_seq_len": 64,
                 "model.tie_embeddings": True, "data.train": [str(tmp_path / "mix/train")],
                 "data.val": [str(tmp_path / "mix/val/web.bin")], "data.seq_len": 32, "data.batch_size": 2,
                 "train.steps": 4, "train.threads": 1, "train.progress": False, "train.tensorboard": False,
                 "train.val_every": 4, "train.val_batches": 2, "optim.warmup_steps": 1, "checkpoint.every": 0}
    result = run_pretrain(load_config(None, [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]))
    assert result.steps == 4 and result.final_val_loss is not None and result.final_val_loss < 12.5
