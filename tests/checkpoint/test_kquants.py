"""Quantizers and llama.cpp's mixes against llama.cpp itself: blocks bit for bit, per-tensor types exactly.

The golden file (scripts/record_llamacpp_kquants.py) holds ggml's blocks for fixed weights, so CI checks
bit-exactness without llama.cpp; with llama-cpp-python installed (a test-only peer) the same is checked
on fresh random blocks and on whole files from ``llama_model_quantize``.
"""

import base64
import ctypes
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from corral.checkpoint.base import weight_shapes
from corral.checkpoint.gguf_quant import MIXES, quantize_tensor, tensor_types
from corral.checkpoint.gguf_reader import read_gguf
from corral.checkpoint.gguf_write import export_gguf
from corral.errors import ConfigError
from corral.model.config import ModelConfig

T = GGMLQuantizationType
GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "llamacpp_quant_blocks.json").read_text())


def _golden_weights() -> np.ndarray:
    raw = base64.b64decode(GOLDEN["weights_f32"])
    return np.frombuffer(raw, np.float32).reshape(GOLDEN["shape"])


@pytest.mark.parametrize("name", sorted(GOLDEN["blocks"]))
def test_quantizer_equals_llamacpp_blocks_in_golden_file(name):
    expected = np.frombuffer(base64.b64decode(GOLDEN["blocks"][name]), np.uint8)
    ours = quantize_tensor(_golden_weights(), T[name]).reshape(-1)
    assert ours.size == expected.size
    block = GGML_QUANT_SIZES[T[name]][1]
    bad = np.nonzero((ours != expected).reshape(-1, block).any(axis=1))[0]
    assert bad.size == 0, f"{name}: blocks {bad.tolist()} differ from llama.cpp's"


def test_use_more_bits_layers_of_a_16_layer_q4_k_m_match_llama_cpp_rules():
    """Llama 3.2 1B: attn_v and ffn_down get Q6_K on layers 0, 1, 4, 7, 10, 13, 14, 15; a tied table Q6_K."""
    config = ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         ffn_hidden_dim=8192, tie_embeddings=True)
    from corral.checkpoint.gguf_write import gguf_name

    tensors = {gguf_name(k): (s, 0) for k, s in weight_shapes(config).items()}
    types = tensor_types(tensors, "Q4_K_M", n_layers=16, n_heads=32, n_kv_heads=8)
    six = [i for i in range(16) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K]
    assert six == [0, 1, 4, 7, 10, 13, 14, 15]
    assert six == [i for i in range(16) if types[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
    assert types["token_embd.weight"] == T.Q6_K and types["blk.3.attn_q.weight"] == T.Q4_K
    assert types["blk.3.attn_norm.weight"] == T.F32
    untied = tensor_types({**tensors, "output.weight": ((128256, 2048), 0)}, "Q4_K_M", n_layers=16)
    assert untied["token_embd.weight"] == T.Q4_K and untied["output.weight"] == T.Q6_K
    q8 = tensor_types(tensors, "Q8_0", n_layers=16)
    assert set(q8[k] for k in tensors if not k.endswith("norm.weight")) == {T.Q8_0}
    assert tensor_types(tensors, "Q4_0", n_layers=16)["token_embd.weight"] == T.Q6_K


def test_70b_shape_moves_q4_k_attn_v_to_q5_k_and_odd_rows_fall_back():
    tensors = {f"blk.{i}.attn_v.weight": ((1024, 8192), 0) for i in range(80)}
    types = tensor_types(tensors, "Q4_K_M", n_layers=80, n_heads=64, n_kv_heads=8)
    assert {types[f"blk.{i}.attn_v.weight"] for i in range(80)} == {T.Q5_K, T.Q6_K}
    odd = {"blk.0.ffn_down.weight": ((64, 640), 0), "blk.1.ffn_down.weight": ((64, 640), 0),
           "blk.0.ffn_up.weight": ((640, 48), 0), "output.weight": ((100, 640), 0)}
    types = tensor_types(odd, "Q4_K_M", n_layers=8)
    # Layer 0 is a more-bits layer: Q6_K -> Q8_0; layer 1 is not: Q4_K -> Q5_0; 48 is not whole 32-blocks -> F16.
    assert types["blk.0.ffn_down.weight"] == T.Q8_0 and types["blk.1.ffn_down.weight"] == T.Q5_0
    assert types["blk.0.ffn_up.weight"] == T.F16 and types["output.weight"] == T.Q8_0
    with pytest.raises(ConfigError, match="Q3_K_M"):
        tensor_types(odd, "Q3_K_M", n_layers=8)


# ---- against llama.cpp itself (llama-cpp-python, test-only peer) -----------------------------------------------

def _ggml_quantize_chunk():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0"])
def test_quantizer_equals_ggml_on_random_weights(name):
    quantize_chunk = _ggml_quantize_chunk()
    rng = np.random.default_rng(7)
    rows = 64
    x = (rng.standard_normal((rows, 1024)) * np.exp(rng.standard_normal((rows, 1)) * 2)).astype(np.float32)
    x[::7, :200] = 0  # zero sub-blocks inside ordinary rows
    block, nbytes = GGML_QUANT_SIZES[T[name]]
    expected = np.zeros(x.size // block * nbytes, np.uint8)
    quantize_chunk(int(T[name]), x.ctypes.data, expected.ctypes.data, 0, rows, x.shape[1], None)
    assert np.array_equal(quantize_tensor(x, T[name]).reshape(-1), expected)


SMALL = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=640,
                    max_seq_len=256)


def _llama_cpp_quantize(src: Path, dest: Path, mix: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix][1])
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params)) == 0


def _same_as_llama_cpp(tmp_path: Path, config: ModelConfig, source_type: str, mix: str) -> None:
    """Quantize one random model both ways from a `source_type` GGUF; every tensor's type and bytes must match."""
    from corral.store.convert import quantize_gguf

    pytest.importorskip("llama_cpp")
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in weight_shapes(config).items()}
    src = export_gguf(config, state, tmp_path / "src.gguf", qtype=source_type)
    _llama_cpp_quantize(src, tmp_path / "theirs.gguf", mix)
    quantize_gguf(src, tmp_path / "ours.gguf", mix)
    with read_gguf(tmp_path / "theirs.gguf") as theirs, read_gguf(tmp_path / "ours.gguf") as ours:
        assert ours.tensors.keys() == theirs.tensors.keys()
        assert ours.metadata["general.file_type"] == theirs.metadata["general.file_type"]
        for name, info in theirs.tensors.items():
            assert (name, ours.tensors[name].type_name) == (name, info.type_name)
            assert np.array_equal(ours.raw(name), theirs.raw(name)), name


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantize_small_model_equals_llama_model_quantize(tmp_path, mix, tied):
    """Every tensor's type and bytes equal llama.cpp's, including fallbacks (ffn_down rows of 640 weights)."""
    _same_as_llama_cpp(tmp_path, dataclasses.replace(SMALL, tie_embeddings=tied), "F16", mix)


@pytest.mark.slow
@pytest.mark.parametrize("source_type", ["BF16", "F32"])
def test_quantize_from_bf16_and_f32_sources_equals_llama_model_quantize(tmp_path, source_type):
    _same_as_llama_cpp(tmp_path, dataclasses.replace(SMALL, n_layers=4), source_type, "Q4_K_M")


def test_cli_quantize_of_an_hf_directory_writes_the_q4_k_m_mix_that_loads(tmp_path, capsys):
    """`corral quantize DIR --type Q4_K_M -o F`: llama.cpp's types, the blocks our quantizer makes from the same
    floats, and weights that dequantize close to the originals."""
    from corral.checkpoint.gguf import load_gguf
    from corral.checkpoint.hf import export_hf
    from corral.cli import main

    config = dataclasses.replace(SMALL, n_layers=2)
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in weight_shapes(config).items()}
    export_hf(config, state, tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), "--type", "Q4_K_M", "-o", str(tmp_path / "q.gguf")]) == 0
    assert "Q4_K_M" in capsys.readouterr().err
    with read_gguf(tmp_path / "q.gguf") as q:
        assert q.metadata["general.file_type"] == 15 and q.metadata["general.quantization_version"] == 2
        types = {n: i.type_name for n, i in q.tensors.items()}
        assert types["blk.1.attn_q.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
        # Of 2 layers only layer 1 gets more bits; ffn_down rows of 640 fall back: Q6_K -> Q8_0, Q4_K -> Q5_0.
        assert (types["blk.1.ffn_down.weight"], types["blk.0.ffn_down.weight"]) == ("Q8_0", "Q5_0")
        assert types["blk.0.attn_v.weight"] == "Q4_K"
        assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
        wq = state["layers.1.attention.wq.weight"].numpy()
        assert np.array_equal(q.raw("blk.1.attn_q.weight"), quantize_tensor(wq, T.Q4_K).reshape(-1))
    loaded = load_gguf(tmp_path / "q.gguf").state_dict
    err = (loaded["layers.1.attention.wq.weight"] - state["layers.1.attention.wq.weight"]).abs().max()
    assert err < 0.02  # 4-bit levels over a ~0.4 range
