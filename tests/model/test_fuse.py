"""Fused q/k/v and w1/w3 projections compute what the separate ones do."""

from __future__ import annotations

import copy

import torch
from torch import nn

from corral.engine.engine import Engine
from corral.engine.sampling import SamplingParams
from corral.model.config import ModelConfig
from corral.model.fuse import FusedAttention, FusedFeedForward, apply_fused_projections_
from corral.model.llama import Transformer, init_weights_

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)


def _model() -> Transformer:
    torch.manual_seed(0)
    return init_weights_(Transformer(CONFIG), std=0.2).eval()


def test_fused_model_logits_match_the_separate_projections():
    model = _model()
    fused = apply_fused_projections_(copy.deepcopy(model))
    assert all(isinstance(b.attention, FusedAttention) and isinstance(b.feed_forward, FusedFeedForward)
               for b in fused.layers)
    assert not hasattr(fused.layers[0].attention, "wq") and not hasattr(fused.layers[0].feed_forward, "w1")
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_fused_model_greedy_tokens_equal_through_the_engine():
    model = _model()
    fused = apply_fused_projections_(copy.deepcopy(model))
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    want = [c.token_ids for c in Engine(model, max_batch_size=2).generate(prompts, params)]
    assert [c.token_ids for c in Engine(fused, max_batch_size=2).generate(prompts, params)] == want


def test_layers_the_fuser_cannot_join_are_left_alone():
    model = _model()
    apply_fused_projections_(model, fuse=lambda parts: None)
    assert type(model.layers[0].attention).__name__ == "Attention"
    assert isinstance(model.layers[0].attention.wq, nn.Linear)
