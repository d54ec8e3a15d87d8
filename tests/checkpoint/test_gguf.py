"""GGUF reading, dequantisation, key map, config and export, checked against gguf-py's independent implementation."""

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize
from gguf_fixtures import GGML_Q2_K, small_valid, smollm2_path, tensor_info
from gguf_fixtures import build as build_bytes

from corral.checkpoint.base import weight_shapes
from corral.checkpoint.gguf import GGUF_TO_META, load_gguf, meta_name, read_gguf
from corral.checkpoint.gguf_dequant import dequantize
from corral.checkpoint.gguf_write import _rope_divisors, export_gguf, gguf_name
from corral.errors import ConfigError, FormatError
from corral.model.config import PRESETS, ModelConfig
from corral.model.rope import rope_frequencies

T = GGMLQuantizationType
PLAIN = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=512)
SCALED = dataclasses.replace(PLAIN, use_scaled_rope=True, tie_embeddings=True, max_seq_len=131072)


def random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in weight_shapes(config).items()}


def same_model(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal as a model: GGUF stores the FFN width itself, not multiple_of / ffn_dim_multiplier."""
    def canon(c):
        return dataclasses.replace(c, ffn_hidden_dim=c.hidden_dim, multiple_of=256, ffn_dim_multiplier=None)
    return canon(a) == canon(b)


# --- key map --------------------------------------------------------------------------------------------------------

def test_meta_name_maps_every_llama_tensor_and_refuses_unknown_names():
    assert meta_name("blk.12.ffn_gate.weight") == "layers.12.feed_forward.w1.weight"
    assert meta_name("blk.0.attn_output.weight") == "layers.0.attention.wo.weight"
    assert meta_name("output_norm.weight") == "norm.weight"
    assert meta_name("blk.01.attn_q.weight") is None
    assert meta_name("blk.0.attn_q.bias") is None and meta_name("rope_freqs.weight") is None
    for gguf, meta in GGUF_TO_META.items():
        assert gguf_name(meta.format(i=7)) == gguf.format(i=7)


# --- parser on hand-built bytes -------------------------------------------------------------------------------------

def test_read_parses_every_value_type_and_reverses_dims(tmp_path):
    path = tmp_path / "small.gguf"
    path.write_bytes(small_valid())
    with read_gguf(path) as gguf:
        m = gguf.metadata
        assert (m["test.u8"], m["test.i8"], m["test.u16"], m["test.i16"]) == (200, -5, 60000, -3000)
        assert (m["test.u32"], m["test.i32"], m["test.u64"], m["test.i64"]) == (4_000_000_000, -7, 2**64 - 1, -(2**63))
        assert (m["test.f32"], m["test.f64"], m["test.bool"]) == (0.5, 0.1, True)
        assert m["tokenizer.ggml.tokens"] == ["a", "b", "é"] and m["tokenizer.ggml.token_type"] == [1, 2, 3]
        assert m["test.nested"] == [[1, 2], ["x"]] and m["test.bools"] == [False, True]
        assert type(m["test.bool"]) is bool and all(type(v) is int for v in m["tokenizer.ggml.token_type"])
        assert gguf.value_types["tokenizer.ggml.token_type"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)
        assert {n: t.shape for n, t in gguf.tensors.items()} == {"a": (2, 3), "b": (4,), "c": (32,)}
        assert gguf.tensor("a").tolist() == [[0, 1, 2], [3, 4, 5]]
        assert gguf.tensor("b", torch.float64).tolist() == [0, 1, 2, 3]
        assert gguf.tensor("c").tolist() == [0.5 * q for q in range(-16, 16)]
        raw = gguf.raw("c")
        assert raw.nbytes == 34 and not raw.flags.writeable
        del raw


def test_read_agrees_with_gguf_py_reader_on_small_file(tmp_path):
    path = tmp_path / "small.gguf"
    path.write_bytes(small_valid())
    ref = GGUFReader(path)
    with read_gguf(path) as ours:
        assert [t.name for t in ref.tensors] == list(ours.tensors)
        for t in ref.tensors:
            info = ours.tensors[t.name]
            assert (info.offset, info.nbytes, info.ggml_type) == (t.data_offset, t.n_bytes, t.tensor_type)
        for key, fld in ref.fields.items():
            if not key.startswith("GGUF.") and key != "test.nested":
                assert ours.metadata[key] == pytest.approx(fld.contents()), key


def test_tensor_of_unsupported_type_is_format_error_naming_tensor_and_type(tmp_path):
    path = tmp_path / "q2k.gguf"
    path.write_bytes(build_bytes([], [tensor_info("blk.0.w", [256], GGML_Q2_K)], b"\0" * 84))
    with read_gguf(path) as gguf, pytest.raises(FormatError, match=r"blk\.0\.w.*Q2_K"):
        gguf.tensor("blk.0.w")


# --- dequantisation against gguf.quants ----------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0])
def test_dequantize_matches_gguf_py_for_quantized_random_data(qtype):
    x = np.random.default_rng(int(qtype)).standard_normal((6, 256)).astype(np.float32) * 3
    packed = ref_quantize(x, qtype)
    expected = ref_dequantize(packed, qtype).reshape(-1)
    ours = dequantize(torch.from_numpy(packed.reshape(-1).view(np.uint8).copy()), qtype, x.size, torch.float32, "x")
    assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32)))
    assert np.abs(expected - x.reshape(-1)).max() < 1.5  # the blocks really hold x, not noise


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_dequantize_matches_gguf_py_for_hand_built_k_quant_blocks(qtype):
    # gguf-py cannot quantize K-quants: every byte pattern is a valid block once the fp16 scales are finite.
    rng = np.random.default_rng(int(qtype))
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (24, size), dtype=np.uint8)
    for at in ([208] if qtype == T.Q6_K else [0, 2]):
        blocks[:, at : at + 2] = rng.uniform(0.001, 0.1, (24, 1)).astype(np.float16).view(np.uint8)
    expected = ref_dequantize(blocks, qtype).reshape(-1)
    ours = dequantize(torch.from_numpy(blocks.reshape(-1).copy()), qtype, 24 * block, torch.float32, "x")
    assert torch.equal(ours, torch.from_numpy(expected))
    assert expected.std() > 0


def test_tensor_from_file_has_torch_shape_and_requested_dtype(tmp_path):
    blocks = np.random.default_rng(0).integers(0, 256, (6, 144), dtype=np.uint8)
    blocks[:, 0:4] = np.array([0.01, 0.02], dtype=np.float16).view(np.uint8)
    writer = GGUFWriter(tmp_path / "k.gguf", "llama")
    writer.add_tensor("w", blocks, raw_dtype=T.Q4_K)  # 6 rows of 256 weights -> torch shape (6, 256)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with read_gguf(tmp_path / "k.gguf") as gguf:
        assert gguf.tensors["w"].shape == (6, 256) and gguf.tensors["w"].type_name == "Q4_K"
        bf16 = gguf.tensor("w", torch.bfloat16)
        f32 = gguf.tensor("w")
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (6, 256)
    assert torch.equal(f32, torch.from_numpy(ref_dequantize(blocks, T.Q4_K)))
    assert torch.equal(bf16, f32.to(torch.bfloat16))


# --- export -> load round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [PLAIN, SCALED], ids=["plain", "scaled_tied"])
def test_export_f32_then_load_is_exact(tmp_path, config):
    state = random_state(config)
    ckpt = load_gguf(export_gguf(config, state, tmp_path / "m.gguf", qtype="F32"))
    assert same_model(ckpt.config, config) and ckpt.format == "gguf"
    assert set(ckpt.state_dict) == set(state)
    for name, w in state.items():
        assert torch.equal(ckpt.state_dict[name], w), name
    assert ("output.weight" in state) == (not config.tie_embeddings)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~umask  # not a temp file's 0o600


@pytest.mark.parametrize("config", [PLAIN, SCALED], ids=["plain", "scaled_tied"])
def test_export_f16_then_load_is_within_fp16_rounding(tmp_path, config):
    state = random_state(config)
    ckpt = load_gguf(export_gguf(config, state, tmp_path / "m.gguf", qtype="F16"))
    assert same_model(ckpt.config, config)
    for name, w in state.items():
        diff = (ckpt.state_dict[name] - w).abs()
        if w.ndim == 1:
            assert torch.equal(ckpt.state_dict[name], w), f"{name}: norms stay F32"
        else:
            assert (diff <= w.abs() * 2**-11 + 1e-7).all() and diff.max() > 0, name


def test_export_q8_0_then_load_is_within_q8_0_error(tmp_path):
    state = random_state(PLAIN)
    path = export_gguf(PLAIN, state, tmp_path / "m.gguf", qtype="Q8_0")
    with read_gguf(path) as gguf:
        types = {n: t.type_name for n, t in gguf.tensors.items()}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    ckpt = load_gguf(path)
    for name, w in state.items():
        blocks = w.reshape(-1, 32) if w.ndim == 2 else w.reshape(1, -1)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127  # Q8_0's scale d per 32-weight block
        diff = (ckpt.state_dict[name].reshape(blocks.shape) - blocks).abs()
        assert (diff <= 0.6 * step + 1e-7).all(), name  # half a step, plus d's fp16 rounding


def test_export_then_load_keeps_explicit_head_dim_and_requested_dtype(tmp_path):
    config = dataclasses.replace(PLAIN, n_heads=2, n_kv_heads=1, head_dim_override=16)  # heads narrower than dim/2
    state = random_state(config)
    ckpt = load_gguf(export_gguf(config, state, tmp_path / "m.gguf"), dtype=torch.bfloat16)
    assert ckpt.config.head_dim == 16 and same_model(ckpt.config, config)
    assert all(torch.equal(ckpt.state_dict[k], w.to(torch.bfloat16)) for k, w in state.items())


def test_export_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tmp_path):
    config = ModelConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=64)
    path = export_gguf(config, random_state(config), tmp_path / "m.gguf", qtype="Q8_0")
    with read_gguf(path) as gguf:
        assert gguf.tensors["blk.0.attn_q.weight"].type_name == "F16"  # rows of 48
        assert gguf.tensors["blk.0.ffn_down.weight"].type_name == "Q8_0"  # rows of 64


def test_exported_file_reads_in_gguf_py_with_llama_cpp_keys_and_meta_qk_layout(tmp_path):
    state = random_state(PLAIN)
    path = export_gguf(PLAIN, state, tmp_path / "m.gguf", qtype="F32")
    ref = GGUFReader(path)
    fields = {k: f.contents() for k, f in ref.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert (fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (64, PLAIN.hidden_dim)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.context_length"] == 512 and fields["llama.rope.freq_base"] == 500000.0
    tensors = {t.name: t for t in ref.tensors}
    assert len(tensors) == 2 * 9 + 3
    k = torch.from_numpy(np.array(tensors["blk.1.attn_k.weight"].data)).reshape(2 * 16, 64)
    assert torch.equal(k, state["layers.1.attention.wk.weight"])  # llama.cpp keeps Meta's adjacent-pair layout


def test_export_writes_llama_cpp_rope_freqs_for_scaled_rope():
    config = PRESETS["llama3.1-8b"]
    # llama.cpp's converter, from its description: divisor 1 above the high-frequency band, `factor` below
    # the low one, and 1 / ((1 - smooth) / factor + smooth) in between.
    freqs = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    wavelen = 2 * math.pi / freqs
    smooth = (8192 / wavelen - 1) / (4 - 1)
    expected = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    np.testing.assert_allclose(_rope_divisors(config), expected, rtol=1e-5)


@pytest.mark.parametrize("params", [dict(rope_scaling_factor=32.0), dict(rope_high_freq_factor=2.0),
                                    dict(rope_old_context_len=4096, rope_scaling_factor=16.0)])
def test_load_recovers_rope_scaling_parameters_from_rope_freqs(tmp_path, params):
    config = dataclasses.replace(SCALED, dim=256, n_heads=2, n_kv_heads=1, **params)  # head_dim 128
    ckpt = load_gguf(export_gguf(config, random_state(config), tmp_path / "m.gguf"))
    assert same_model(ckpt.config, config)
    assert torch.equal(rope_frequencies(ckpt.config), rope_frequencies(config))


def _write_gguf(path, config: ModelConfig, tensors: dict[str, np.ndarray], **kv) -> None:
    """A llama GGUF written directly with gguf-py, so a test can break it on purpose."""
    writer = GGUFWriter(path, kv.pop("arch", "llama"))
    values = {"block_count": config.n_layers, "context_length": config.max_seq_len, "embedding_length": config.dim,
              "feed_forward_length": config.hidden_dim, "attention.head_count": config.n_heads,
              "attention.head_count_kv": config.kv_heads, "attention.layer_norm_rms_epsilon": config.norm_eps,
              "rope.freq_base": config.rope_theta, "vocab_size": config.vocab_size, **kv}
    for key, value in values.items():
        if value is not None:
            kind = GGUFValueType.FLOAT32 if isinstance(value, float) else GGUFValueType.UINT32
            writer.add_key_value(f"{writer.arch}.{key}", value, kind)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(config: ModelConfig) -> dict[str, np.ndarray]:
    return {gguf_name(k): v.numpy() for k, v in random_state(config).items()}


@pytest.mark.parametrize("change,field", [
    (dict(arch="gpt2"), "general.architecture"),
    (dict(block_count=None), "llama.block_count"),
    (dict(block_count=3), "llama.block_count"),
    (dict(n_heads_bad=True), "llama.*"),
    (dict(value_length=8), "llama.attention.value_length"),
    (dict(drop="blk.1.ffn_down.weight"), "'blk.1.ffn_down.weight'"),
    (dict(add="blk.0.attn_q.bias"), "'blk.0.attn_q.bias'"),
    (dict(add="blk.2.attn_norm.weight"), "'blk.2.attn_norm.weight'"),
    (dict(reshape="blk.0.attn_k.weight"), "'blk.0.attn_k.weight'"),
    (dict(rope_freqs=np.linspace(1, 3, 8, dtype=np.float32)), "'rope_freqs.weight'"),
    (dict(rope_freqs=np.ones(5, dtype=np.float32)), "'rope_freqs.weight'"),
])
def test_load_refuses_inconsistent_model_naming_the_field(tmp_path, change, field):
    tensors = _gguf_tensors(PLAIN)
    kv = {}
    if "arch" in change:
        kv["arch"] = change["arch"]
    if "block_count" in change:
        kv["block_count"] = change["block_count"]
    if "value_length" in change:
        kv.update({"attention.key_length": 16, "attention.value_length": 8})
    if change.get("n_heads_bad"):
        kv["attention.head_count_kv"] = 3  # does not divide 4 heads
    tensors.pop(change.get("drop", ""), None)
    if "add" in change:
        tensors[change["add"]] = np.zeros(64, dtype=np.float32)
    if "reshape" in change:
        tensors[change["reshape"]] = tensors[change["reshape"]].reshape(16, -1)
    if "rope_freqs" in change:
        tensors["rope_freqs.weight"] = change["rope_freqs"]
    _write_gguf(tmp_path / "bad.gguf", PLAIN, tensors, **kv)
    with pytest.raises(FormatError) as info:
        load_gguf(tmp_path / "bad.gguf")
    assert field in str(info.value)


def test_load_treats_all_ones_rope_freqs_as_unscaled(tmp_path):
    tensors = {**_gguf_tensors(PLAIN), "rope_freqs.weight": np.ones(8, dtype=np.float32)}
    _write_gguf(tmp_path / "m.gguf", PLAIN, tensors)
    assert load_gguf(tmp_path / "m.gguf").config.use_scaled_rope is False


# --- export: metadata and atomic writes -----------------------------------------------------------------------------

def test_export_passes_tokenizer_and_general_metadata_with_llama_cpp_types(tmp_path):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 3],
            "tokenizer.ggml.scores": [0.0, -1.5], "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": "{{ x }}", "general.name": "tiny",
            "general.architecture": "gpt2", "llama.block_count": 99, "other.key": 1}
    path = export_gguf(PLAIN, random_state(PLAIN), tmp_path / "m.gguf", metadata=meta)
    with read_gguf(path) as gguf:
        m, types = gguf.metadata, gguf.value_types
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "general.name"):
        assert m[key] == meta[key], key
    assert (m["general.architecture"], m["llama.block_count"]) == ("llama", 2)
    assert "other.key" not in m and "tokenizer.ggml.merges" not in m
    assert types["tokenizer.ggml.token_type"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert types["tokenizer.ggml.scores"] == (GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    assert types["tokenizer.ggml.bos_token_id"] == (GGUFValueType.UINT32, None)


def test_export_failure_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    from corral.checkpoint import gguf_write

    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"old")
    calls = []

    def failing_encode(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(*args)

    original = gguf_write._encode
    monkeypatch.setattr(gguf_write, "_encode", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(PLAIN, random_state(PLAIN), dest)
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_export_refuses_bad_qtype_and_mismatched_state_dict_without_writing(tmp_path):
    state = random_state(PLAIN)
    with pytest.raises(ConfigError, match="Q4_K"):
        export_gguf(PLAIN, state, tmp_path / "a.gguf", qtype="Q4_K")
    del state["layers.1.ffn_norm.weight"]
    with pytest.raises(ConfigError, match="layers.1.ffn_norm.weight"):
        export_gguf(PLAIN, state, tmp_path / "b.gguf")
    state = random_state(PLAIN)
    state["norm.weight"] = torch.zeros(63)
    with pytest.raises(ConfigError, match="norm.weight"):
        export_gguf(PLAIN, state, tmp_path / "c.gguf")
    assert list(tmp_path.iterdir()) == []


# --- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(smollm2_path())


@pytest.fixture(scope="module")
def smollm2_ref():
    """gguf-py's own reader of the same file: the independent implementation (slow: ~5 s of vocabulary parsing)."""
    return GGUFReader(smollm2_path())


def test_smollm2_loads_all_272_tensors_with_preset_config(smollm2):
    assert smollm2.config == PRESETS["smollm2-135m"]
    assert len(smollm2.state_dict) == 272 and "output.weight" not in smollm2.state_dict
    assert all(w.dtype == torch.float32 for w in smollm2.state_dict.values())
    assert smollm2.metadata["tokenizer.ggml.model"] == "gpt2"
    assert len(smollm2.metadata["tokenizer.ggml.tokens"]) == 49152
    assert all(isinstance(t, str) for t in smollm2.metadata["tokenizer.ggml.merges"][:100])


def test_smollm2_header_agrees_with_gguf_py_reader(smollm2_ref):
    ref = smollm2_ref
    with read_gguf(smollm2_path()) as ours:
        assert ours.version == 3 and len(ours.tensors) == len(ref.tensors) == 272
        for t in ref.tensors:
            info = ours.tensors[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
            assert (info.offset, info.nbytes, info.ggml_type) == (t.data_offset, t.n_bytes, t.tensor_type)
        for key, fld in ref.fields.items():
            if not key.startswith("GGUF."):
                assert ours.metadata[key] == pytest.approx(fld.contents()), key


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.attn_k.weight",
                                  "token_embd.weight"])
def test_smollm2_weights_equal_gguf_py_dequantize(smollm2, smollm2_ref, name):
    t = next(t for t in smollm2_ref.tensors if t.name == name)
    rows = np.array(t.data)[:2048]  # (rows, bytes per row); 2048 rows keeps the numpy reference quick
    expected = torch.from_numpy(ref_dequantize(rows, t.tensor_type))
    ours = smollm2.state_dict[meta_name(name)]
    assert t.tensor_type in (T.Q4_1, T.Q8_0)
    assert torch.equal(ours[: expected.shape[0]], expected)


def test_smollm2_teacher_forced_top1_agrees_with_llama_cpp(smollm2):
    """The q/k layout and dequantisation, end to end: llama.cpp's recorded argmax for 128 positions."""
    from corral.llm import build_model

    golden = json.loads((Path(__file__).parents[1] / "golden" / "smollm2_llamacpp_top1.json").read_text())
    ids = golden["token_ids"][: len(golden["top1"])]
    model = build_model(smollm2.config, smollm2.state_dict)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(ours, golden["top1"]))
    assert agree >= 0.95 * len(ids), f"top-1 agreement {agree}/{len(ids)}"
