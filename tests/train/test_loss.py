"""The fused chunked loss (corral.train.loss) against the reference path: F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import tiny_config, write_tiny_data

from corral.errors import ConfigError
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_
from corral.train.loop import read_metrics
from corral.train.loss import (
    build_loss,
    linear_cross_entropy,
    linear_logprobs,
    linear_logprobs_top,
    output_weight,
    sequence_logprobs,
)
from corral.train.pretrain import run_pretrain


def _problem(rows_per_seq: int = 13, vocab: int = 50):
    torch.manual_seed(0)
    h = torch.randn(3, rows_per_seq, 16, requires_grad=True)  # (B, T, dim): 39 rows
    w = torch.randn(vocab, 16, requires_grad=True)  # (vocab, dim)
    targets = torch.randint(0, vocab, (3, rows_per_seq))
    targets[0, 2] = targets[2, -1] = -100  # ignored positions, as F.cross_entropy's ignore_index
    return h, w, targets


def _tiny_model(tied: bool) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                         max_seq_len=32, tie_embeddings=tied)
    return init_weights_(Transformer(config))


@pytest.mark.parametrize("chunk_rows", [1, 8, 39, 1000])
def test_linear_cross_entropy_matches_reference_loss_and_gradients(chunk_rows):
    h, w, targets = _problem()
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), targets.flatten())
    (ref * 0.25).backward()  # a grad-accumulation factor reaches both gradients
    want_h, want_w = h.grad, w.grad
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, targets, chunk_rows)
    (got * 0.25).backward()
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    assert torch.allclose(h.grad, want_h, rtol=1e-5, atol=1e-8)
    assert torch.allclose(w.grad, want_w, rtol=1e-5, atol=1e-8)
    assert h.grad[0, 2].abs().max() == 0  # an ignored row gets no gradient


def test_linear_cross_entropy_without_grad_builds_no_graph():
    h, w, targets = _problem()
    with torch.no_grad():
        ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), targets.flatten())
        got = linear_cross_entropy(h, w, targets, chunk_rows=8)
    assert got.grad_fn is None and not got.requires_grad
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_then_output_projection_equals_model_forward(tied):
    # The loss projects model.hidden's states itself, with precomputed rotary tables; both must give forward's logits.
    model = _tiny_model(tied)
    tokens = torch.randint(0, 64, (2, 12))
    hidden = model.hidden(tokens, rope=model.rope_tables(12))  # (B, T, dim)
    assert torch.equal(F.linear(hidden, output_weight(model)), model(tokens))
    assert torch.equal(model.hidden(tokens), hidden)


def test_chunked_loss_run_matches_reference_loss_run(tmp_path):
    write_tiny_data(tmp_path)
    chunked = run_pretrain(tiny_config(tmp_path / "a", tmp_path, steps=6, **{"train.loss_chunk_rows": 24}))
    reference = run_pretrain(tiny_config(tmp_path / "b", tmp_path, steps=6, **{"train.loss_chunk_rows": 0}))
    got, want = read_metrics(chunked.metrics_path), read_metrics(reference.metrics_path)
    assert [got[s]["loss"] for s in sorted(got)] == pytest.approx([want[s]["loss"] for s in sorted(want)], rel=1e-5)
    assert chunked.final_val_loss == pytest.approx(reference.final_val_loss, rel=1e-5)
    assert want[6]["loss"] < want[1]["loss"] - 0.1  # the runs learned; equal losses are not vacuous


def test_negative_loss_chunk_rows_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.loss_chunk_rows"):
        tiny_config(tmp_path / "a", tmp_path, **{"train.loss_chunk_rows": -1})


def test_compiled_trunk_loss_matches_eager_loss_and_gradients():
    # aot_eager traces the trunk in one graph (fullgraph) with forward and backward as inductor would, in
    # 2 s instead of 35 s; inductor's own kernels are torch's to test (the benchmark runs them).
    model = _tiny_model(tied=True)
    tokens, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    eager = build_loss(model, chunk_rows=16)(tokens, targets)
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = build_loss(model, chunk_rows=16, compile=True, backend="aot_eager")(tokens, targets)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("chunk_rows", [1, 8, 1000])
def test_linear_logprobs_match_log_softmax_and_its_gradients(chunk_rows):
    h, w, targets = _problem()
    logp = F.log_softmax(F.linear(h, w), dim=-1)  # (B, T, vocab): the plain reference
    ref = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))  # any incoming gradient
    (ref * weights).sum().backward()
    want_h, want_w = h.grad, w.grad
    h.grad = w.grad = None
    got = linear_logprobs(h, w, targets, chunk_rows)
    (got * weights).sum().backward()
    assert got.shape == targets.shape and got[0, 2] == 0  # an ignored position gives 0
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h.grad, want_h, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w.grad, want_w, rtol=1e-4, atol=1e-6)
    assert h.grad[0, 2].abs().max() == 0


@pytest.mark.parametrize("tied", [True, False])
def test_sequence_logprobs_equal_log_softmax_of_model_logits(tied):
    model = _tiny_model(tied)
    tokens = torch.randint(0, 64, (2, 12))
    targets = tokens.roll(-1, dims=1)
    want = F.log_softmax(model(tokens), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    got = sequence_logprobs(model, tokens, targets, chunk_rows=5)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # Summed log-likelihood's gradient reaches the trunk like the reference's does.
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.log_softmax(model(tokens), dim=-1).gather(-1, targets[..., None]).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_linear_logprobs_top_matches_logprobs_and_argmax_across_chunks():
    torch.manual_seed(0)
    h, weight = torch.randn(7, 16), torch.randn(50, 16)
    logits = h @ weight.t()  # (7, 50)
    targets = logits.argmax(-1)
    targets[::2] = (targets[::2] + 1) % 50  # rows 0, 2, 4, 6 are not the argmax
    targets[3] = -100  # an ignored row: log p 0
    lp, top = linear_logprobs_top(h, weight, targets, chunk_rows=3)
    assert torch.equal(lp, linear_logprobs(h, weight, targets, chunk_rows=3))
    assert top.tolist() == [False, True, False, False, False, True, False]
