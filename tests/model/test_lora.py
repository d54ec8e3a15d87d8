"""apply_lora / merge_lora on a tiny random Transformer (Hu et al. 2021, arXiv 2106.09685)."""

import dataclasses

import pytest
import torch
from torch import nn

from corral.errors import ConfigError
from corral.model.config import PRESETS
from corral.model.fuse import apply_fused_projections_
from corral.model.llama import Transformer, init_weights_
from corral.model.lora import (
    BLOCK_TARGETS,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_lora,
)

TINY = dataclasses.replace(PRESETS["debug"], n_layers=2, vocab_size=512, max_seq_len=64)


def tiny_model(tied: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return init_weights_(Transformer(dataclasses.replace(TINY, tie_embeddings=tied))).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize_b_(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.05)


def test_apply_lora_starts_equal_to_base_model():
    model, x = tiny_model(), tokens()
    before = model(x)
    apply_lora(model, BLOCK_TARGETS + ("output",), rank=4, alpha=8)
    assert torch.equal(model(x), before)  # B = 0: the adapter adds exactly nothing
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"layers.{i}.{t}" for i in range(2) for t in BLOCK_TARGETS} | {"output"}


def test_apply_lora_trains_only_adapter_parameters():
    model = apply_lora(tiny_model(), ["attention.wq", "attention.wv"], rank=4, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.{w}.lora_{ab}.weight" for i in range(2) for w in ("wq", "wv")
                         for ab in "ab"}
    a = model.layers[0].attention.wq.lora_a.weight
    assert a.shape == (4, TINY.dim) and a.abs().max() > 0  # Kaiming-uniform, not zeros
    x = tokens()
    loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable
    # B = 0 at the start, so dL/dA = B^T (...) = 0 and only B moves on the first step.
    assert all((g.abs().sum() > 0) == ("lora_b" in n) for n, g in grads.items())


def test_lora_forward_is_base_plus_scaled_b_a():
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False)
    layer = LoRALinear(base, rank=4, alpha=12.0)
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    x = torch.randn(3, 64)
    expected = x @ base.weight.T + (12.0 / 4) * (x @ layer.lora_a.weight.T @ layer.lora_b.weight.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_sgd_steps_lower_the_loss():
    model = apply_lora(tiny_model(), BLOCK_TARGETS, rank=8, alpha=16).train()
    x = tokens()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("tied", [False, True])
def test_merge_lora_matches_unmerged_logits_and_restores_meta_names(tied):
    model = tiny_model(tied)
    names = set(model.state_dict())
    targets = BLOCK_TARGETS if tied else BLOCK_TARGETS + ("output",)
    apply_lora(model, targets, rank=4, alpha=8, dropout=0.1).eval()
    randomize_b_(model)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == names
    assert (unmerged - tiny_model(tied)(x)).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_merge_lora_keeps_bf16_base_dtype():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, ["feed_forward.w2"], rank=2, alpha=2)
    assert model.layers[0].feed_forward.w2.lora_a.weight.dtype is torch.bfloat16
    merge_lora(model)
    assert model.layers[0].feed_forward.w2.weight.dtype is torch.bfloat16


def test_lora_state_dict_holds_only_adapter():
    model = apply_lora(tiny_model(), ["attention.wq"], rank=2, alpha=2)
    assert set(lora_state_dict(model)) == {f"layers.{i}.attention.wq.lora_{ab}.weight" for i in range(2)
                                          for ab in "ab"}


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_apply_lora_bad_rank_raises_config_error(rank):
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(tiny_model(), rank=rank)


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf")])
def test_apply_lora_bad_alpha_raises_config_error(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        apply_lora(tiny_model(), alpha=alpha)


def test_apply_lora_bad_dropout_raises_config_error():
    with pytest.raises(ConfigError, match="dropout"):
        apply_lora(tiny_model(), dropout=1.0)


@pytest.mark.parametrize("target", ["q_proj", "attention.wqkv", "tok_embeddings", "wq"])
def test_apply_lora_unknown_target_raises_config_error_naming_it(target):
    model = tiny_model()
    with pytest.raises(ConfigError, match=f"unknown lora target '{target}'"):
        apply_lora(model, [target])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_apply_lora_output_on_tied_model_raises_config_error():
    with pytest.raises(ConfigError, match="tie"):
        apply_lora(tiny_model(tied=True), ["output"])


def test_apply_lora_after_fusing_raises_config_error():
    model = apply_fused_projections_(tiny_model())
    with pytest.raises(ConfigError, match="fused"):
        apply_lora(model, ["attention.wq"])


def test_apply_lora_layers_limits_blocks_and_ends_backward_there():
    model = apply_lora(tiny_model(), ["attention.wq", "feed_forward.w2"], rank=2, alpha=2, layers=[1])
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"layers.1.attention.wq", "layers.1.feed_forward.w2"}
    x = tokens()
    h0 = []
    model.layers[0].register_forward_hook(lambda m, i, o: h0.append(o))
    model(x).sum().backward()
    assert not h0[0].requires_grad  # nothing below layer 1 is on the autograd tape


@pytest.mark.parametrize("layers", [[], [2], [-1]])
def test_apply_lora_layers_outside_the_model_raise_config_error(layers):
    with pytest.raises(ConfigError, match="layers"):
        apply_lora(tiny_model(), layers=layers)
