"""The token loader: shifted targets, disjoint ranks, exact resume of its position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corral.data.shards import write_shard
from corral.errors import ConfigError
from corral.train.config import OptimConfig
from corral.train.loader import TokenLoader
from corral.train.optim import lr_factor


@pytest.fixture
def shards(tmp_path):
    return [write_shard(tmp_path / "a.bin", np.arange(0, 301)), write_shard(tmp_path / "b.bin", np.arange(301, 650))]


def test_targets_are_inputs_shifted_across_shard_boundaries(shards):
    loader = TokenLoader(shards, seq_len=8, batch_size=4, shuffle=False)
    for _ in range(loader.batches_per_epoch):
        inputs, targets = loader.next_batch()
        assert inputs.shape == (4, 8) and inputs.dtype == torch.int64
        assert torch.equal(targets, inputs + 1)  # the stream is 0, 1, 2, ... across both shards


def test_ranks_read_disjoint_slices_of_the_global_batch(shards):
    whole = TokenLoader(shards, seq_len=8, batch_size=4, seed=3)
    parts = [TokenLoader(shards, seq_len=8, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(5):
        expected, _ = whole.next_batch()
        got = torch.cat([p.next_batch()[0] for p in parts])
        assert torch.equal(got, expected)


def test_state_dict_resumes_the_exact_sequence_of_batches(shards):
    first = TokenLoader(shards, seq_len=8, batch_size=4, seed=1)
    for _ in range(23):  # past an epoch boundary (20 batches per epoch)
        first.next_batch()
    saved = first.state_dict()
    expected = [first.next_batch()[0] for _ in range(5)]
    second = TokenLoader(shards, seq_len=8, batch_size=4, seed=1)
    second.load_state_dict(saved)
    assert saved["epoch"] == 1
    assert all(torch.equal(a, second.next_batch()[0]) for a in expected)


def test_position_from_other_data_is_refused(shards):
    saved = TokenLoader(shards, seq_len=8, batch_size=4).state_dict()
    with pytest.raises(ConfigError, match="n_windows"):
        TokenLoader(shards[:1], seq_len=8, batch_size=4).load_state_dict(saved)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min():
    config = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, config, total_steps=14) for s in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[9] == pytest.approx(0.55) and factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
