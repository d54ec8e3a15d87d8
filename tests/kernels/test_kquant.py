"""corral.kernels.kquant (kquant.c): K-quant matmuls against float64 references (STYLE.md 12).

Blocks are random bytes with sane fp16 scales, so every code, 6-bit scale and high bit occurs. Two
references: (1) the kernel's own arithmetic in float64 -- the blocks decoded here in numpy, times the
activations quantised as documented (per 256: xd = max|x| / 127, round half to even) -- which the kernel
must meet to float32 rounding; (2) gguf's own dequantization times the unquantised activations, which
the kernel must meet within the activation rounding bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize

from corral import kernels
from corral.errors import ConfigError, FormatError
from corral.kernels.kquant import KQ_BLOCK_BYTES, KQuantEmbedding, KQuantLinear
from corral.kernels.linear import gguf_linear

TYPES = {"q4_k": GT.Q4_K, "q5_k": GT.Q5_K, "q6_k": GT.Q6_K}
N, K = 37, 768  # N odd: a partial last tile; K = 3 blocks of 256

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")


def random_blocks(ggml_type: int, n: int = N, k: int = K, seed: int = 0) -> np.ndarray:
    """(n, row bytes) uint8: random codes and scales, fp16 super-block scales in [1e-3, 1e-2)."""
    rng = np.random.default_rng(seed)
    size = KQ_BLOCK_BYTES[int(ggml_type)]
    raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (n, k // 256, 2)).astype(np.float16).view(np.uint8).reshape(n, k // 256, 4)
    if ggml_type == GT.Q6_K:
        raw[..., 208:210] = scales[..., :2]
    else:
        raw[..., 0:4] = scales
    return raw.reshape(n, -1)


def decode64(ggml_type: int, raw: np.ndarray, k: int) -> np.ndarray:
    """The weights (n, k) in float64, decoded from the documented layouts (ours, not gguf's code)."""
    b = raw.reshape(-1, KQ_BLOCK_BYTES[int(ggml_type)]).astype(np.int64)
    f16 = raw.reshape(-1, KQ_BLOCK_BYTES[int(ggml_type)])
    if ggml_type == GT.Q6_K:
        d = f16[:, 208:210].copy().view(np.float16).astype(np.float64)  # (nb, 1)
        sc = f16[:, 192:208].copy().view(np.int8).astype(np.float64)  # (nb, 16)
        w = np.empty((b.shape[0], 256))
        for h in range(2):
            for g in range(4):
                lo = b[:, 64 * h + 32 * (g % 2): 64 * h + 32 * (g % 2) + 32]
                lo = lo & 15 if g < 2 else lo >> 4
                q = lo | (((b[:, 128 + 32 * h: 160 + 32 * h] >> (2 * g)) & 3) << 4)
                s = np.repeat(sc[:, 8 * h + 2 * g: 8 * h + 2 * g + 2], 16, axis=1)
                w[:, 128 * h + 32 * g: 128 * h + 32 * g + 32] = d * s * (q - 32)
        return w.reshape(raw.shape[0], k)
    five = ggml_type == GT.Q5_K
    d = f16[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = f16[:, 2:4].copy().view(np.float16).astype(np.float64)
    s = b[:, 4:16]
    sc = np.concatenate((s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)), axis=1)
    mn = np.concatenate((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), axis=1)
    qs = b[:, 48:176] if five else b[:, 16:144]
    w = np.empty((b.shape[0], 256))
    for j in range(8):
        q = (qs[:, 32 * (j // 2): 32 * (j // 2) + 32] >> (4 * (j % 2))) & 15
        if five:
            q = q | (((b[:, 16:48] >> j) & 1) << 4)
        w[:, 32 * j: 32 * j + 32] = d * sc[:, j: j + 1] * q - dmin * mn[:, j: j + 1]
    return w.reshape(raw.shape[0], k)


def quantize_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> xq (M, K/256, 256), xd (M, K/256): the documented activation quantisation, in float32 steps."""
    g = x.float().reshape(x.shape[0], -1, 256)
    xd = g.abs().amax(-1) / 127
    inv = torch.where(xd > 0, 1 / xd, torch.zeros_like(xd))
    return torch.round(g * inv[..., None]), xd


def matmul_ref(x: torch.Tensor, w64: np.ndarray) -> torch.Tensor:
    xq, xd = quantize_ref(x)
    xhat = (xq.double() * xd.double()[..., None]).reshape(x.shape[0], -1)  # exactly what the integer sums see
    return xhat @ torch.from_numpy(w64).T


def make(name: str, n: int = N, k: int = K, seed: int = 0) -> tuple[KQuantLinear, np.ndarray]:
    raw = random_blocks(TYPES[name], n, k, seed)
    lin = KQuantLinear.from_gguf_blocks(torch.from_numpy(raw.reshape(-1)), int(TYPES[name]), (n, k))
    return lin, raw


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("M", [1, 3, 8, 13, 40])
def test_matmul_matches_float64_reference_of_its_arithmetic(name, M):
    lin, raw = make(name)
    x = torch.randn(M, K)
    ref = matmul_ref(x, decode64(TYPES[name], raw, K))
    y = lin(x)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", TYPES)
def test_scalar_path_matches_reference(name):
    lin, raw = make(name, seed=3)
    x = torch.randn(9, K)
    ref = matmul_ref(x, decode64(TYPES[name], raw, K))
    simd = lin(x)
    old = kernels.set_force_scalar(True)
    try:
        scalar = lin(x)
    finally:
        kernels.set_force_scalar(old)
    assert (scalar.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (simd - scalar).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", TYPES)
def test_matmul_close_to_gguf_dequantize_times_x(name):
    """Against gguf's dequantization and the unrounded activations: off by no more than activation rounding."""
    lin, raw = make(name, seed=1)
    w = torch.from_numpy(gguf_dequantize(raw, TYPES[name])).double()  # (N, K)
    assert torch.allclose(w, torch.from_numpy(decode64(TYPES[name], raw, K)), rtol=1e-6, atol=1e-9)
    assert torch.equal(lin.dequantize(), w.float())
    x = torch.randn(16, K)
    _, xd = quantize_ref(x)
    bound = w.abs() @ (xd.double() / 2).repeat_interleave(256, dim=1).T  # |W| @ (xd / 2 per element)
    err = (lin(x).double() - x.double() @ w.T).abs()
    assert (err <= bound.T * 1.001 + 1e-5).all()
    assert err.max() > 0


@pytest.mark.parametrize("name", TYPES)
def test_a_row_gives_the_same_bits_whatever_the_batch(name):
    lin, _ = make(name, n=50, seed=2)
    x = torch.randn(19, K)
    batch = lin(x)
    for i in (0, 7, 8, 18):
        assert torch.equal(lin(x[i:i + 1]), batch[i:i + 1])
    assert torch.equal(lin(x[3:11]), batch[3:11])


def test_results_do_not_depend_on_thread_count():
    lin, _ = make("q4_k", n=600, k=2048)
    x = torch.randn(5, 2048)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        two = lin(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_fused_parts_of_mixed_types_equal_outputs_side_by_side():
    parts = [make("q4_k", n=64)[0], make("q6_k", n=21, seed=1)[0], make("q5_k", n=19, seed=2)[0]]
    fused = KQuantLinear.fuse_rows(parts)
    x = torch.randn(3, K)
    assert fused.out_features == 104 and fused.types == (12, 14, 13)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert fused.part0.data_ptr() == parts[0].part0.data_ptr()  # stacked, not copied
    with pytest.raises(ConfigError):
        KQuantLinear.fuse_rows([make("q4_k")[0], make("q4_k", k=512)[0]])


@pytest.mark.parametrize("name", TYPES)
def test_embedding_widens_only_the_rows_it_takes(name):
    raw = random_blocks(TYPES[name], 50, 512, seed=4)
    emb = KQuantEmbedding(int(TYPES[name]), torch.from_numpy(raw.reshape(-1)), (50, 512), torch.float32)
    w = torch.from_numpy(gguf_dequantize(raw, TYPES[name]))
    tokens = torch.tensor([[3, 49, 0], [3, 7, 11]])
    assert torch.equal(emb(tokens), w[tokens])
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))


def test_bad_input_is_refused():
    with pytest.raises(FormatError):
        KQuantLinear.from_gguf_blocks(torch.zeros(100, dtype=torch.uint8), int(GT.Q4_K), (N, K))
    with pytest.raises(ConfigError):
        KQuantLinear.from_gguf_blocks(torch.zeros(144, dtype=torch.uint8), int(GT.Q4_K), (1, 288))
    with pytest.raises(ValueError):
        make("q4_k")[0](torch.randn(2, K + 256))


def test_gguf_linear_picks_the_kernel_and_keeps_the_bytes_in_place():
    raw = torch.from_numpy(random_blocks(GT.Q5_K).reshape(-1))
    lin = gguf_linear(int(GT.Q5_K), raw, (N, K))
    assert isinstance(lin, KQuantLinear) and lin.part0.data_ptr() == raw.data_ptr()


def test_without_kernels_the_forward_widens_for_the_call(monkeypatch):
    lin, raw = make("q6_k")
    x = torch.randn(2, K)
    monkeypatch.setattr(kernels, "available", lambda: False)
    lin.__dict__.pop("_cache", None)
    w = torch.from_numpy(gguf_dequantize(raw, GT.Q6_K))
    assert torch.allclose(lin(x), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q6_K"])
@pytest.mark.parametrize("tied", [True, False])
def test_a_k_quant_file_loads_in_place_and_matches_its_widened_load(tmp_path, qtype, tied):
    """A Q4_K_M / Q6_K GGUF (our quantizer follows llama.cpp's mix): every linear and the token table stay
    K-quant modules over the mapped file, fused q|k|v mixes types, and the logits match the fp32 load."""
    import dataclasses

    from corral.checkpoint.gguf_write import export_gguf
    from corral.llm import _load_model
    from corral.model.config import ModelConfig
    from corral.model.llama import Transformer, init_weights_

    config = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=512,
                         max_seq_len=64, tie_embeddings=tied)
    torch.manual_seed(0)
    model = init_weights_(Transformer(dataclasses.replace(config))).eval()
    path = export_gguf(config, model.state_dict(), tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    _, native = _load_model(path, None, "gguf")
    _, dense = _load_model(path, None, None)
    layer = native.layers[0]
    assert isinstance(native.tok_embeddings, KQuantEmbedding) and isinstance(native.output, KQuantLinear)
    assert all(isinstance(m, KQuantLinear) for m in (layer.attention.wqkv, layer.attention.wo,
                                                     layer.feed_forward.w13, layer.feed_forward.w2))
    if qtype == "Q4_K_M":  # llama.cpp's mix keeps v (and w2) of some layers in Q6_K
        assert (GT.Q4_K, GT.Q4_K, GT.Q6_K) in [lay.attention.wqkv.types for lay in native.layers]
    tokens = torch.arange(1, 40).view(1, 39)
    with torch.no_grad():
        a, b = native(tokens), dense(tokens)
    assert (a - b).abs().max() <= 0.05 * b.abs().max(), (a - b).abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
