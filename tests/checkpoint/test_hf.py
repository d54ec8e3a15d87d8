"""HF Llama directories: transformers writes them, load_hf reads them, export_hf writes them back,
and transformers loads our export to the same logits as the original model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from corral.checkpoint.base import permute_qk
from corral.checkpoint.hf import config_from_hf, export_hf, load_hf, meta_to_hf_key
from corral.checkpoint.safetensors_io import read_safetensors, write_safetensors
from corral.errors import FormatError

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
             intermediate_size=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=256)
SCALED = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64})
VARIANTS = {"plain": {}, "scaled": SCALED, "tied": {"tie_word_embeddings": True}}


def _hf_model(variant: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, **VARIANTS[variant])).eval()
    with torch.no_grad():
        # Norm weights start at 1.0; make every tensor distinct so a swapped key cannot pass.
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[LlamaForCausalLM, Path]]:
    out = {}
    for variant in VARIANTS:
        model = _hf_model(variant)
        path = tmp_path_factory.mktemp(f"hf-{variant}")
        model.save_pretrained(path, safe_serialization=True)
        out[variant] = (model, path)
    return out


def _logits(model: LlamaForCausalLM) -> torch.Tensor:
    ids = (torch.arange(0, 252, 7) * 13 % 256).reshape(2, 18)  # (B, T)
    with torch.no_grad():
        return model(ids).logits


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_hf_maps_every_weight_to_meta_names(saved, variant):
    model, path = saved[variant]
    ckpt = load_hf(path)
    hf_state = model.state_dict()
    assert ckpt.format == "hf"
    for key, tensor in ckpt.state_dict.items():
        expected = hf_state[meta_to_hf_key(key)]
        if key.endswith("attention.wq.weight"):
            tensor = permute_qk(tensor, 4)
        elif key.endswith("attention.wk.weight"):
            tensor = permute_qk(tensor, 2)
        assert torch.equal(tensor, expected), key
    expected_count = 2 * 9 + 2 + (0 if variant == "tied" else 1)
    assert len(ckpt.state_dict) == expected_count
    assert ("output.weight" in ckpt.state_dict) is (variant != "tied")


def test_config_from_hf_maps_every_field(saved):
    ckpt = load_hf(saved["scaled"][1])
    c = ckpt.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (64, 2, 4, 2, 256)
    assert (c.hidden_dim, c.norm_eps, c.rope_theta, c.max_seq_len) == (128, 1e-5, 500000.0, 256)
    assert c.use_scaled_rope and not c.tie_embeddings and c.head_dim == 16 and c.head_dim_override is None
    assert (c.rope_scaling_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_old_context_len) == (
        8.0, 1.0, 4.0, 64)
    assert load_hf(saved["tied"][1]).config.tie_embeddings
    assert not load_hf(saved["plain"][1]).config.use_scaled_rope


def test_config_from_hf_reads_transformers_4_style_llama31_config():
    # The shape of meta-llama/Llama-3.1-8B's config.json (rope_theta and rope_scaling at top level).
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    c = config_from_hf(cfg)
    assert (c.dim, c.hidden_dim, c.kv_heads, c.rope_theta, c.max_seq_len) == (4096, 14336, 8, 500000.0, 131072)
    assert c.use_scaled_rope and c.rope_scaling_factor == 8.0 and c.rope_old_context_len == 8192


def test_config_from_hf_keeps_head_dim_that_differs_from_hidden_over_heads():
    cfg = dict(SMALL, model_type="llama", head_dim=32)
    assert config_from_hf(cfg).head_dim == 32
    assert config_from_hf(dict(SMALL, model_type="llama", head_dim=16)).head_dim_override is None


def _rope_meta(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's RoPE: adjacent pairs as complex numbers. x (T, H, head_dim)."""
    T, _, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)  # (T, hd/2)
    xc = torch.view_as_complex(x.double().reshape(T, -1, hd // 2, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[:, None, :]).reshape(x.shape)


def _rope_hf(x: torch.Tensor, theta: float) -> torch.Tensor:
    """HF's RoPE: first half rotated against the second half. x (T, H, head_dim)."""
    T, _, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs).repeat(1, 2)[:, None, :]  # (T, 1, hd)
    x = x.double()
    rotated = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def test_load_hf_qk_layout_gives_the_attention_scores_of_hf_rope(saved):
    # Independent of permute_qk: q.k under Meta's RoPE with our weights == under HF's RoPE with HF's weights.
    model, path = saved["plain"]
    ckpt = load_hf(path)
    x = torch.randn(5, 64, dtype=torch.float64)
    attn = model.model.layers[1].self_attn
    q_hf = _rope_hf((x @ attn.q_proj.weight.double().T).reshape(5, 4, 16), 500000.0)
    k_hf = _rope_hf((x @ attn.k_proj.weight.double().T).reshape(5, 2, 16), 500000.0)
    wq, wk = ckpt.state_dict["layers.1.attention.wq.weight"], ckpt.state_dict["layers.1.attention.wk.weight"]
    q_meta = _rope_meta((x @ wq.double().T).reshape(5, 4, 16), 500000.0)
    k_meta = _rope_meta((x @ wk.double().T).reshape(5, 2, 16), 500000.0)
    scores_hf = torch.einsum("thd,shd->hts", q_hf, k_hf.repeat_interleave(2, dim=1))
    scores_meta = torch.einsum("thd,shd->hts", q_meta, k_meta.repeat_interleave(2, dim=1))
    assert torch.allclose(scores_meta, scores_hf, atol=1e-9)
    assert not torch.allclose((x @ wq.double().T), (x @ attn.q_proj.weight.double().T))


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_hf_round_trip_loads_in_transformers_with_same_logits(saved, variant, tmp_path):
    model, path = saved[variant]
    ckpt = load_hf(path)
    export_hf(ckpt.config, ckpt.state_dict, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(reloaded), _logits(model), atol=1e-5, rtol=0)
    _assert_same_tensors(load_hf(tmp_path).state_dict, ckpt.state_dict)
    written = read_safetensors(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in written) is (variant != "tied")
    for key, tensor in written.items():
        assert torch.equal(tensor, model.state_dict()[key]), key


def test_load_hf_reads_transformers_sharded_index_like_single_file(saved, tmp_path):
    model, single = saved["plain"]
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    _assert_same_tensors(load_hf(tmp_path).state_dict, load_hf(single).state_dict)


def test_export_hf_sharded_loads_in_transformers_with_same_logits(saved, tmp_path):
    model, path = saved["scaled"]
    ckpt = load_hf(path)
    export_hf(ckpt.config, ckpt.state_dict, tmp_path, max_shard_bytes=40_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert all(p.stat().st_size < 40_000 + 4096 for p in shards if len(read_safetensors(p)) > 1)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(reloaded), _logits(model), atol=1e-5, rtol=0)
    _assert_same_tensors(load_hf(tmp_path).state_dict, ckpt.state_dict)


def test_export_hf_config_reads_back_in_transformers_llamaconfig(saved, tmp_path):
    ckpt = load_hf(saved["scaled"][1])
    export_hf(ckpt.config, ckpt.state_dict, tmp_path, dtype=torch.bfloat16, extra_config={"eos_token_id": 7})
    cfg = LlamaConfig.from_pretrained(tmp_path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rms_norm_eps, cfg.eos_token_id) == (128, 256, 1e-5, 7)
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 64
    assert math.isclose(rope.get("rope_theta", getattr(cfg, "rope_theta", None)), 500000.0)
    assert {t.dtype for t in read_safetensors(tmp_path / "model.safetensors").values()} == {torch.bfloat16}


def test_load_hf_keeps_stored_dtype_unless_asked(saved, tmp_path):
    ckpt = load_hf(saved["plain"][1])
    export_hf(ckpt.config, ckpt.state_dict, tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in load_hf(tmp_path).state_dict.values()} == {torch.bfloat16}
    converted = load_hf(tmp_path, dtype=torch.float32).state_dict
    assert {t.dtype for t in converted.values()} == {torch.float32}
    key = "layers.0.attention.wq.weight"
    assert torch.equal(converted[key], ckpt.state_dict[key].to(torch.bfloat16).float())


def test_load_hf_metadata_carries_config_and_tokenizer_files(saved, tmp_path):
    ckpt = load_hf(saved["plain"][1])
    (tmp_path / "src").mkdir()
    tok_config = tmp_path / "src" / "tokenizer_config.json"
    tok_config.write_text(json.dumps({"chat_template": "{{ messages }}"}))
    tok_json = tmp_path / "src" / "tokenizer.json"
    tok_json.write_text("{}")
    out = tmp_path / "out"
    export_hf(ckpt.config, ckpt.state_dict, out, tokenizer_files=[tok_config, tok_json])
    meta = load_hf(out).metadata
    assert meta["config"]["hidden_size"] == 64
    assert meta["tokenizer_config"] == {"chat_template": "{{ messages }}"}
    assert Path(meta["tokenizer_json"]) == out / "tokenizer.json" and (out / "tokenizer.json").read_text() == "{}"
    assert "tokenizer_config" not in ckpt.metadata and "tokenizer_json" not in ckpt.metadata


def test_export_hf_replaces_weights_of_an_earlier_export(saved, tmp_path):
    ckpt = load_hf(saved["plain"][1])
    export_hf(ckpt.config, ckpt.state_dict, tmp_path, max_shard_bytes=40_000)
    export_hf(ckpt.config, ckpt.state_dict, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    export_hf(ckpt.config, ckpt.state_dict, tmp_path, max_shard_bytes=40_000)
    assert not (tmp_path / "model.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp files left
    _assert_same_tensors(load_hf(tmp_path).state_dict, ckpt.state_dict)


# ---- refusals ------------------------------------------------------------------------------

def _copy_of(saved, variant: str, tmp_path: Path) -> Path:
    ckpt = load_hf(saved[variant][1])
    export_hf(ckpt.config, ckpt.state_dict, tmp_path, max_shard_bytes=40_000)
    return tmp_path


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, field", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"architectures": "LlamaForCausalLM", "model_type": None}, "architectures"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
])
def test_load_hf_refuses_unsupported_config(saved, tmp_path, changes, field):
    path = _copy_of(saved, "plain", tmp_path)
    _edit_json(path / "config.json", **changes)
    with pytest.raises(FormatError) as info:
        load_hf(path)
    assert info.value.field == field


def test_load_hf_refuses_index_path_traversal(saved, tmp_path):
    path = _copy_of(saved, "plain", tmp_path / "model")
    outside = tmp_path / "evil.safetensors"
    write_safetensors({"x": torch.zeros(1)}, outside)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../evil.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"not a plain file name") as info:
        load_hf(path)
    assert info.value.field == "weight_map"
    index["weight_map"]["model.norm.weight"] = str(outside)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"not a plain file name"):
        load_hf(path)


def test_load_hf_refuses_index_entries_that_are_not_found(saved, tmp_path):
    path = _copy_of(saved, "plain", tmp_path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="missing: model-00099-of-00099") as info:
        load_hf(path)
    assert info.value.field == "model.layers.0.mlp.up_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"]["model.norm.weight"]
                 and f.startswith("model-0") and "00099" not in f)  # a real shard, not the missing one set above
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = other
    index["weight_map"]["model.norm.weight"] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="listed in the index but not in") as info:
        load_hf(path)
    assert info.value.field in ("model.norm.weight", "model.layers.0.mlp.up_proj.weight")


def _rewrite_single(path: Path, edit) -> None:
    tensors = dict(read_safetensors(path / "model.safetensors"))
    edit(tensors)
    write_safetensors(tensors, path / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), "layers.1.feed_forward.w2.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "model.layers.0.self_attn.q_proj.bias"),
    (lambda t: t.update({"model.layers.2.input_layernorm.weight": torch.zeros(64)}), "layers.2.attention_norm.weight"),
    (lambda t: t.update({"model.layers.01.input_layernorm.weight": torch.zeros(64)}),
     "model.layers.01.input_layernorm.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}),
     "layers.0.attention.wk.weight"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(256, 64)}), "output.weight"),
])
def test_load_hf_names_missing_unexpected_or_misshapen_tensors(saved, tmp_path, edit, field):
    variant = "tied" if field == "output.weight" else "plain"
    ckpt = load_hf(saved[variant][1])
    export_hf(ckpt.config, ckpt.state_dict, tmp_path)
    _rewrite_single(tmp_path, edit)
    with pytest.raises(FormatError) as info:
        load_hf(tmp_path)
    assert info.value.field == field


def test_load_hf_drops_lm_head_equal_to_tied_embedding(saved, tmp_path):
    ckpt = load_hf(saved["tied"][1])
    export_hf(ckpt.config, ckpt.state_dict, tmp_path)
    _rewrite_single(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert "output.weight" not in load_hf(tmp_path).state_dict


def test_load_hf_refuses_directory_without_weights(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved["plain"][1] / "config.json").read_text())
    with pytest.raises(FormatError, match="no model.safetensors"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="not a JSON object"):
        load_hf(tmp_path)
