"""QLoRA: LoRA over a base kept in GGUF blocks, widened tile by tile in forward and backward.

The float reference (STYLE.md 12) is the same model with every block weight widened once by
corral.checkpoint.gguf_dequant: outputs, input gradients and a training step must match it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T
from torch import nn

from corral.checkpoint.gguf_dequant import dequantize
from corral.checkpoint.gguf_quant import quantize_tensor
from corral.kernels.qlora import apply_qlora_base_, qlora_linear
from corral.model.config import PRESETS
from corral.model.llama import Transformer, init_weights_
from corral.model.lora import LoRALinear, apply_lora, merge_lora
from corral.model.qlora import TiledBlockLinear

# ffn_hidden_dim 512: K-quant rows hold whole 256-weight blocks
TINY = dataclasses.replace(PRESETS["debug"], n_layers=2, vocab_size=512, max_seq_len=64, ffn_hidden_dim=512)
LINEAR = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
          "feed_forward.w3")


def blocks(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Corral's GGUF quantizer: float (out, in) -> flat uint8 blocks."""
    data = quantize_tensor(w.numpy(), T(ggml_type))
    return torch.from_numpy(np.ascontiguousarray(data).reshape(-1).view(np.uint8).copy())


def widened(raw: torch.Tensor, ggml_type: int, shape) -> torch.Tensor:
    return dequantize(raw, ggml_type, shape[0] * shape[1], torch.float32, "w").view(shape)


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K])
def test_tiled_block_linear_matches_widened_weight_in_forward_and_backward(ggml_type):
    torch.manual_seed(0)
    shape = (40, 512)  # 40 rows: tiles of 16, 16 and a last one of 8
    raw = blocks(torch.randn(shape), ggml_type)
    layer = qlora_linear(int(ggml_type), raw, shape, tile_rows=16)
    w = widened(raw, int(ggml_type), shape)
    x = torch.randn(2, 3, 512, requires_grad=True)
    g = torch.randn(2, 3, 40)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(layer(x.detach()), x.detach() @ w.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-4)
    assert list(layer.parameters()) == []  # the blocks are a buffer: nothing to train, no gradient
    torch.testing.assert_close(layer.dequantize(), w)


def test_tiled_block_linear_never_widens_more_than_a_tile():
    torch.manual_seed(0)
    raw = blocks(torch.randn(100, 64), T.Q8_0)
    widths = []
    base = qlora_linear(int(T.Q8_0), raw, (100, 64), tile_rows=32)
    decode = base.decode
    spy = TiledBlockLinear(base.rows, 64, lambda rows: widths.append(rows.shape[0]) or decode(rows), tile_rows=32)
    x = torch.randn(5, 64, requires_grad=True)
    spy(x).sum().backward()
    assert widths == [32, 32, 32, 4] * 2  # forward, then backward again: tile by tile, never all 100 rows


def quantized(model: Transformer, ggml_type: int) -> dict:
    """Meta name -> (ggml_type, flat blocks, shape) for every block linear and the (tied) token table."""
    out = {}
    for name, p in model.state_dict().items():
        if name == "tok_embeddings.weight" or any(name.endswith(f"{t}.weight") for t in LINEAR):
            out[name] = (ggml_type, blocks(p, ggml_type), tuple(p.shape))
    return out


def pair(ggml_type: int, tied: bool = True) -> tuple[Transformer, Transformer]:
    """(QLoRA model on blocks, float model holding the widened blocks), both with the same LoRA init."""
    torch.manual_seed(0)
    dense = init_weights_(Transformer(dataclasses.replace(TINY, tie_embeddings=tied)))
    raw = quantized(dense, ggml_type)
    with torch.device("meta"):
        shell = Transformer(dense.config)
    shell.load_state_dict({k: v for k, v in dense.state_dict().items() if k not in raw}, strict=False, assign=True)
    qlora = apply_qlora_base_(shell, raw)
    reference = dense
    with torch.no_grad():
        for name, (t, data, shape) in raw.items():
            reference.get_submodule(name.removesuffix(".weight")).weight.copy_(widened(data, t, shape))
    for model in (qlora, reference):
        torch.manual_seed(1)
        apply_lora(model, LINEAR, rank=4, alpha=8)
    return qlora, reference


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_K])
def test_qlora_steps_match_the_widened_float_model(ggml_type):
    qlora, reference = pair(int(ggml_type))
    assert isinstance(qlora.layers[0].attention.wq.base, TiledBlockLinear)
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (qlora, reference)]
    losses = {id(m): [] for m in (qlora, reference)}
    for _ in range(3):
        for model, opt in zip((qlora, reference), opts):
            loss = loss_of(model, tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[id(model)].append(loss.item())
    np.testing.assert_allclose(losses[id(qlora)], losses[id(reference)], rtol=1e-4)
    # Gradients reached the lowest block's adapters through every quantized layer above them.
    assert qlora.layers[0].attention.wq.lora_a.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for n, p in qlora.named_parameters() if "lora_" not in n)


def test_qlora_trains_and_merges_into_a_dense_model():
    qlora, _ = pair(int(T.Q8_0))
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in qlora.parameters() if p.requires_grad], lr=2e-2)
    first = None
    for _ in range(15):
        loss = loss_of(qlora, tokens)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5  # about ln(512) = 6.2 at the start
    with torch.no_grad():
        trained = qlora(tokens)
        merge_lora(qlora)
        assert not any(isinstance(m, (LoRALinear, TiledBlockLinear)) for m in qlora.layers.modules())
        torch.testing.assert_close(qlora(tokens), trained, rtol=1e-4, atol=1e-4)
