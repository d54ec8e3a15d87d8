"""Our Transformer against Hugging Face transformers' LlamaForCausalLM, an independent implementation.

Random weights with Llama 3.0, 3.1 (scaled RoPE) and 3.2 (tied embeddings) shapes, scaled down;
saved by transformers, read by Corral's HF loader, compared in fp32.
"""

import pytest
import torch

from corral.checkpoint.load import load_checkpoint
from corral.engine.kv_cache import KVCache
from corral.llm import build_model
from corral.model.config import PRESETS

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SCALED = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
SHAPES = {
    # name: (rope_scaling, tied, max_position_embeddings)
    "llama3.0": (None, False, 8192),
    "llama3.1": (SCALED, False, 131072),
    "llama3.2": ({**SCALED, "factor": 32.0}, True, 131072),
}


def make_hf_model(version: str, tmp_path):
    rope_scaling, tied, max_pos = SHAPES[version]
    config = transformers.LlamaConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=768,
        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=max_pos,
        tie_word_embeddings=tied, rope_scaling=rope_scaling,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, tmp)
    ckpt = load_checkpoint(tmp, dtype=torch.float32)
    return request.param, hf, build_model(ckpt.config, ckpt.state_dict)


def test_logits_match_transformers_fp32(pair):
    version, hf, ours = pair
    tokens = torch.randint(0, 128256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= TOL, f"{version}: max |diff| {diff}"


def test_kv_cached_continuation_matches_transformers(pair):
    version, hf, ours = pair
    tokens = torch.randint(0, 128256, (2, 40), generator=torch.Generator().manual_seed(2))
    cache = KVCache(ours.config, max_batch_size=2, max_seq_len=64, dtype=torch.float32)
    with torch.no_grad():
        full = hf(tokens).logits
        # Prefill 24 tokens, a 12-token chunk at offset 24, then 4 single-token decode steps.
        parts = [ours(tokens[:, :24], 0, cache), ours(tokens[:, 24:36], 24, cache)]
        parts += [ours(tokens[:, p : p + 1], p, cache) for p in range(36, 40)]
    diff = (torch.cat(parts, dim=1) - full).abs().max().item()
    assert diff <= TOL, f"{version}: cached max |diff| {diff}"


def test_config_read_from_hf_matches_shape(pair):
    version, hf, ours = pair
    cfg = ours.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == (256, 4, 8, 2, 768)
    assert cfg.use_scaled_rope == (version != "llama3.0")
    assert cfg.tie_embeddings == (version == "llama3.2")
    assert (ours.output is None) == cfg.tie_embeddings


@pytest.mark.parametrize("name,hidden", [("llama3-8b", 14336), ("llama3-70b", 28672), ("llama3.1-405b", 53248),
                                         ("llama3.2-1b", 8192), ("llama3.2-3b", 8192), ("smollm2-135m", 1536)])
def test_preset_ffn_width_matches_reference(name, hidden):
    assert PRESETS[name].hidden_dim == hidden


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3.1-70b", 70.55), ("llama3.1-405b", 405.85),
                                           ("llama3.2-1b", 1.24), ("llama3.2-3b", 3.21)])
def test_preset_parameter_count_matches_meta(name, billions):
    assert PRESETS[name].num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_meta_params_json_of_31_and_32_get_their_context_and_scaling():
    from corral.model.config import ModelConfig

    base = {"n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256, "ffn_dim_multiplier": 1.5,
            "norm_eps": 1e-5, "rope_theta": 500000.0}
    llama32_1b = ModelConfig.from_params({**base, "dim": 2048, "n_layers": 16, "use_scaled_rope": True})
    assert (llama32_1b.max_seq_len, llama32_1b.rope_scaling_factor) == (131072, 32.0)
    llama31_8b = ModelConfig.from_params({**base, "dim": 4096, "n_layers": 32, "ffn_dim_multiplier": 1.3,
                                          "multiple_of": 1024, "use_scaled_rope": True})
    assert (llama31_8b.max_seq_len, llama31_8b.rope_scaling_factor) == (131072, 8.0)
    llama30 = ModelConfig.from_params({**base, "dim": 4096, "n_layers": 32})
    assert (llama30.max_seq_len, llama30.use_scaled_rope) == (8192, False)
