"""corral.kernels (q4q8.c) against plain torch arithmetic (STYLE.md 12).

The reference quantises the activations the way the kernel says it does (blocks of 32, xd = max|x|/127,
round half to even) and sums the blocks in float64, so the kernel must agree to float32 rounding; a second
check bounds its distance from the dense fp32 product by the activation rounding error. GGUF parsing is
checked against gguf's own numpy quantizer and dequantizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from corral import kernels
from corral.errors import ConfigError, FormatError
from corral.kernels.linear import Q4Linear, Q8Linear, fuse_rows, gguf_linear
from corral.model.quant import Int4Linear

ROOT = Path(__file__).parents[2]
SCHEMES = {"q4_0": (Q4Linear, GT.Q4_0), "q4_1": (Q4Linear, GT.Q4_1), "q8_0": (Q8Linear, GT.Q8_0)}
N, K = 37, 608  # N odd (a partial last tile); K = 19 blocks: not a multiple of 256, odd block count

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")


@pytest.fixture
def scalar():
    old = kernels.set_force_scalar(True)
    yield
    kernels.set_force_scalar(old)


def make(scheme: str, n: int = N, k: int = K, seed: int = 0):
    torch.manual_seed(seed)
    cls, _ = SCHEMES[scheme]
    return cls.from_float(torch.randn(n, k) * 0.1 + 0.02, scheme)


def quantize_ref(x: torch.Tensor):
    """(M, K) -> xq (M, nb, 32) int, xd (M, nb): the documented activation quantisation, in torch."""
    g = x.float().reshape(x.shape[0], -1, 32)
    xd = g.abs().amax(-1) / 127
    inv = torch.where(xd > 0, 1 / xd, torch.zeros_like(xd))
    return torch.round(g * inv[..., None]), xd


def matmul_ref(x: torch.Tensor, lin) -> torch.Tensor:
    """sum over blocks of xd * (d * sum(q * xq) + m * sum(xq)), in float64."""
    codes, d, m = lin.blocks()
    xq, xd = (t.double() for t in quantize_ref(x))
    d = d.double()
    if lin.kind == kernels.KIND_Q8:
        q, m = codes.view(torch.int8).double(), torch.zeros_like(d)
    else:
        q = torch.cat((codes & 0x0F, codes >> 4), dim=-1).double()  # (N, nb, 32)
        m = m.double() if m is not None else -8 * d
    isum = torch.einsum("mbk,nbk->mnb", xq, q)
    return (xd[:, None] * (d[None] * isum + m[None] * xq.sum(-1)[:, None])).sum(-1)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M", [1, 3, 8, 33, 512])
def test_matmul_matches_reference_arithmetic(scheme, M):
    lin = make(scheme)
    x = torch.randn(M, K)
    ref = matmul_ref(x, lin)
    y = lin(x)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scalar_path_matches_reference_and_simd(scheme, scalar):
    lin = make(scheme)
    x = torch.randn(9, K)
    y_scalar = lin(x)
    ref = matmul_ref(x, lin)
    assert (y_scalar.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    kernels.set_force_scalar(False)
    assert (lin(x) - y_scalar).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_matmul_close_to_dense_within_activation_rounding(scheme):
    lin = make(scheme)
    x = torch.randn(16, K)
    w = lin.dequantize().double()
    dense = x.double() @ w.T
    # Each x is off by at most xd/2 after rounding to its block's grid, so |error| <= |W| @ (xd/2 per element).
    _, xd = quantize_ref(x)
    bound = w.abs() @ (xd.double() / 2).repeat_interleave(32, dim=1).T
    err = (lin(x).double() - dense).abs()
    assert (err <= bound.T * 1.001 + 1e-5).all()
    assert err.max() > 0  # the activations really were quantised


@pytest.mark.parametrize("simd", [True, False])
def test_quantize_activations_match_torch_exactly(simd):
    x = torch.randn(5, K) * torch.logspace(-3, 3, 5)[:, None]
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    x[1, 5] = 2.5 * (x[1, :32].abs().max() / 127)  # a tie for round-half-to-even
    old = kernels.set_force_scalar(not simd)
    try:
        q, xd, xs = kernels.quantize_activations(x)
    finally:
        kernels.set_force_scalar(old)
    ref_q, ref_d = quantize_ref(x)
    assert torch.equal(q.view(5, -1, 32).float(), ref_q)
    assert torch.equal(xd, ref_d)
    assert torch.equal(xs, ref_q.sum(-1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_from_gguf_blocks_dequantizes_like_gguf(scheme):
    cls, ggml_type = SCHEMES[scheme]
    w = (np.random.default_rng(0).standard_normal((N, K)) * 0.1).astype(np.float32)
    raw = gguf_quantize(w, ggml_type)  # (N, bytes) as stored in a GGUF file
    lin = cls.from_gguf_blocks(torch.from_numpy(raw.reshape(-1).copy()), int(ggml_type), (N, K))
    assert torch.equal(lin.dequantize(), torch.from_numpy(gguf_dequantize(raw, ggml_type)))
    x = torch.randn(4, K)
    assert (lin(x).double() - matmul_ref(x, lin)).abs().max() <= 1e-5 * matmul_ref(x, lin).abs().max()


def test_from_gguf_blocks_refuses_bad_input():
    with pytest.raises(FormatError):
        Q4Linear.from_gguf_blocks(torch.zeros(100, dtype=torch.uint8), int(GT.Q4_1), (N, K))
    with pytest.raises(ConfigError):
        Q4Linear.from_gguf_blocks(torch.zeros(20 * N, dtype=torch.uint8), int(GT.Q8_0), (N, 32))
    with pytest.raises(ConfigError):
        Q8Linear.from_float(torch.randn(4, 48), "q8_0")  # in_features not a multiple of 32
    with pytest.raises(ValueError):
        make("q4_1")(torch.randn(2, K + 32))


def test_forward_keeps_leading_shape_and_dtype():
    lin = make("q4_1")
    x = torch.randn(2, 3, K)
    y = lin(x.bfloat16())
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    assert torch.equal(y, lin(x.bfloat16().float()).bfloat16())  # widened in, computed in fp32, rounded out
    assert torch.equal(lin(x[:, :, :]), lin(x.transpose(0, 1).contiguous()).transpose(0, 1))


def test_results_do_not_depend_on_thread_count():
    lin = make("q4_1", n=1536, k=576)
    x = torch.randn(8, 576)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        two = lin(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_fuse_rows_equals_outputs_side_by_side():
    parts = [make("q4_1", n=64), make("q4_0", n=37, seed=1), make("q4_1", n=19, seed=2)]
    fused = fuse_rows(parts)
    x = torch.randn(3, K)
    assert fused.out_features == 120
    assert torch.allclose(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError):
        fuse_rows([make("q4_1"), make("q8_0")])


def test_buffers_survive_dtype_moves_and_state_dict():
    lin = make("q4_1")
    x = torch.randn(2, K)
    y = lin(x)
    lin.to(torch.bfloat16)  # integer buffers are left alone
    assert all(b.dtype == torch.uint8 for b in lin.buffers())
    assert torch.equal(lin(x), y)
    other = make("q4_1", seed=5)
    other.load_state_dict(lin.state_dict())
    assert torch.equal(other(x), y)


def test_no_compiler_means_unavailable_and_torch_fallback(monkeypatch, tmp_path):
    lin = make("q4_1")
    x = torch.randn(2, K)
    lin(x)  # the kernel was in use
    saved = dict(kernels._state)
    monkeypatch.setenv("CORRAL_CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    kernels._state.clear()
    try:
        assert not kernels.available()
        assert "no C compiler" in kernels.unavailable_reason()
        raw = torch.from_numpy(gguf_quantize(np.ones((16, 64), np.float32), GT.Q4_1).reshape(-1).copy())
        assert isinstance(gguf_linear(int(GT.Q4_1), raw, (16, 64)), Int4Linear)  # torch's kernel instead
        lin.__dict__.pop("_cache", None)
        assert torch.equal(lin(x), x @ lin.dequantize().T)  # still runs: dequantize + F.linear
    finally:
        kernels._state.clear()
        kernels._state.update(saved)
        lin.__dict__.pop("_cache", None)


def test_failing_build_reports_its_reason(monkeypatch, tmp_path):
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    cc.chmod(0o755)
    saved = dict(kernels._state)
    monkeypatch.setenv("CORRAL_CC", str(cc))
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    kernels._state.clear()
    try:
        assert not kernels.available()
        assert "broken compiler" in kernels.unavailable_reason()
        assert not list((tmp_path / "kernels").glob("*.so"))  # no half-built library left behind
    finally:
        kernels._state.clear()
        kernels._state.update(saved)


CHILD = """
import torch
from corral import kernels
from corral.kernels.linear import Q4Linear
assert kernels.available(), kernels.unavailable_reason()
lin = Q4Linear.from_float(torch.ones(8, 64), "q4_1")
print(float(lin(torch.ones(1, 64)).sum()))
"""


def test_concurrent_first_builds_from_two_processes(tmp_path):
    env = {**os.environ, "CORRAL_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("CORRAL_CC", None)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert float(out) == pytest.approx(8 * 64)
    files = sorted(f.name for f in (tmp_path / "kernels").iterdir())
    assert len(files) == 1 and files[0].endswith(".so"), files  # one library, no temporary files left


def test_vector_exp_is_within_two_ulp_of_float64_exp():
    """Softmax and SwiGLU take e^x from an AVX2 polynomial 8 lanes at a time (expf for the tail and on
    builds without AVX2); over the float range where e^x is normal it stays within 2 float32 ulp."""
    x = torch.linspace(-87.0, 88.0, 200_003, dtype=torch.float32)  # not a multiple of 8: the tail runs too
    got = x.clone()
    total = kernels.library().corral_exp_inplace(got.data_ptr(), got.numel())
    want = x.double().exp()
    rel = ((got.double() - want).abs() / want).max().item()
    assert rel <= 2 * 2.0**-23, rel
    assert total == float("inf")  # the float32 sum of values up to e^88 overflows, as a softmax's never does
    small = torch.linspace(-10.0, 10.0, 1001)
    out = small.clone()  # kept alive: the C call writes through its pointer
    total = kernels.library().corral_exp_inplace(out.data_ptr(), out.numel())
    assert total == pytest.approx(small.double().exp().sum().item(), rel=1e-6)
    if kernels.has_simd():  # eight lanes take the vector path, which clamps: tiny, exactly 1, large but finite
        edge = torch.tensor([-200.0, 0.0, 200.0, float("-inf")] * 2)
        kernels.library().corral_exp_inplace(edge.data_ptr(), 8)
        assert (edge[0::4] < 2e-38).all() and (edge[1::4] == 1.0).all() and (edge[3::4] < 2e-38).all()
        assert torch.isfinite(edge).all() and (edge[2::4] > 1e38).all()
