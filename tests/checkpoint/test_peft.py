"""PEFT adapters both ways against peft on transformers' LlamaForCausalLM (STYLE.md 12).

A tiny random Llama is saved by transformers and loaded by Corral, so both sides hold the same base
weights; an adapter saved by one side must give the other side's logits within 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

from corral.checkpoint.adapter import adapter_of, apply_adapter, load_adapter
from corral.checkpoint.hf import load_hf
from corral.checkpoint.peft import PREFIX, WEIGHTS, corral_key, peft_key, save_peft_adapter
from corral.checkpoint.safetensors_io import read_safetensors, write_safetensors
from corral.errors import FormatError
from corral.llm import build_model
from corral.model.lora import BLOCK_TARGETS, LoRALinear, apply_lora, merge_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
             intermediate_size=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=256)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(transformers model, its directory): a tiny random Llama with distinct weights."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("hf-base")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def corral_model(path):
    ckpt = load_hf(path)
    return build_model(ckpt.config, ckpt.state_dict).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def random_b_(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.1)


def test_peft_key_map_round_trips_every_target():
    for target in (*BLOCK_TARGETS, "output"):
        for which in "ab":
            name = f"layers.3.{target}.lora_{which}.weight" if target != "output" else f"output.lora_{which}.weight"
            assert corral_key(peft_key(name)) == name
    assert peft_key("layers.0.attention.wq.lora_a.weight") == f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    assert peft_key("layers.1.feed_forward.w2.lora_b.weight") == f"{PREFIX}model.layers.1.mlp.down_proj.lora_B.weight"
    assert peft_key("output.lora_a.weight") == f"{PREFIX}lm_head.lora_A.weight"


@pytest.mark.parametrize("name", [f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                  f"{PREFIX}model.embed_tokens.lora_A.weight",
                                  f"{PREFIX}model.layers.0.input_layernorm.lora_A.weight",
                                  "model.layers.0.self_attn.q_proj.lora_A.weight"])
def test_corral_key_refuses_non_lora_tensors_naming_them(name):
    with pytest.raises(FormatError):
        corral_key(name)


def test_corral_saved_adapter_loads_in_peft_with_same_logits(base, tmp_path):
    hf, path = base
    model = apply_lora(corral_model(path), (*BLOCK_TARGETS, "output"), rank=4, alpha=8)
    random_b_(model)
    with torch.no_grad():
        ours = model(TOKENS)
    save_peft_adapter(adapter_of(model), model.config, tmp_path / "adapter", base_model=str(path))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == {*HF_TARGETS, "lm_head"}
    theirs = hf_logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), tmp_path / "adapter").eval())
    assert (theirs - hf_logits(hf)).abs().max() > 1e-2  # the adapter moved peft's logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_saved_adapter_loads_in_corral_with_same_logits(base, tmp_path, rslora):
    hf, path = base
    torch.manual_seed(2)
    # init_lora_weights=False: B is random too, so the adapter is not a no-op (B = 0 would hide a wrong map).
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(path),
                                LoraConfig(r=8, lora_alpha=16, target_modules=HF_TARGETS, use_rslora=rslora,
                                           alpha_pattern={"down_proj": 4}, init_lora_weights=False)).eval()
    theirs = hf_logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = corral_model(path)
    adapter = load_adapter(tmp_path / "adapter", model.config)
    assert adapter.format == "peft" and adapter.rank == 8
    with torch.no_grad():
        ours = apply_adapter(model, adapter)(TOKENS)
        assert (theirs - hf_logits(hf)).abs().max() > 1e-2
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        torch.testing.assert_close(merge_lora(model)(TOKENS), theirs, rtol=0, atol=1e-4)


def test_peft_adapter_for_another_base_raises_format_error_naming_tensor_and_shapes(base, tmp_path):
    _, path = base
    other = LlamaForCausalLM(LlamaConfig(**{**SMALL, "hidden_size": 128}))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    with pytest.raises(FormatError, match=r"q_proj.lora_A.weight.*\(4, 128\).*\(4, 64\)"):
        load_adapter(tmp_path / "wide", corral_model(path).config)


def test_peft_adapter_with_extra_layer_raises_format_error(base, tmp_path):
    _, path = base
    deep = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 3}))
    get_peft_model(deep, LoraConfig(r=4, target_modules=["v_proj"])).save_pretrained(tmp_path / "deep")
    with pytest.raises(FormatError, match=r"layers\.2\.self_attn\.v_proj"):
        load_adapter(tmp_path / "deep", corral_model(path).config)


@pytest.mark.parametrize("change, field", [({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "peft_type"),
                                           ({"bias": "all"}, "bias"), ({"lora_alpha": -1}, "lora_alpha")])
def test_peft_adapter_config_unsupported_options_raise_format_error(base, tmp_path, change, field):
    hf, path = base
    model = apply_lora(corral_model(path), ["attention.wq"], rank=2, alpha=2)
    save_peft_adapter(adapter_of(model), model.config, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with pytest.raises(FormatError, match=field):
        load_adapter(tmp_path / "a", model.config)


def test_peft_adapter_missing_lora_b_raises_format_error(base, tmp_path):
    _, path = base
    model = apply_lora(corral_model(path), ["attention.wq"], rank=2, alpha=2)
    save_peft_adapter(adapter_of(model), model.config, tmp_path / "a")
    tensors = read_safetensors(tmp_path / "a" / WEIGHTS)
    write_safetensors({k: v.clone() for k, v in tensors.items() if "layers.1.self_attn.q_proj.lora_B" not in k},
                      tmp_path / "a" / WEIGHTS)
    with pytest.raises(FormatError, match="lora_a without lora_b"):
        load_adapter(tmp_path / "a", model.config)


def test_peft_adapter_with_alpha_pattern_round_trips_through_corral(base, tmp_path):
    _, path = base
    torch.manual_seed(3)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(path),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                                           rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 2},
                                           init_lora_weights=False)).eval()
    theirs = hf_logits(peft_model)
    peft_model.save_pretrained(tmp_path / "theirs")
    config = corral_model(path).config
    save_peft_adapter(load_adapter(tmp_path / "theirs", config), config, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and len(cfg["rank_pattern"]) == 2 and len(cfg["alpha_pattern"]) == 2
    again = hf_logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), tmp_path / "ours").eval())
    torch.testing.assert_close(again, theirs, rtol=0, atol=1e-5)


def test_corral_adapter_on_some_layers_names_full_modules_and_loads_in_peft(base, tmp_path):
    hf, path = base
    model = apply_lora(corral_model(path), ["attention.wk", "feed_forward.w1"], rank=2, alpha=4, layers=[1])
    random_b_(model)
    with torch.no_grad():
        ours = model(TOKENS)
    save_peft_adapter(adapter_of(model), model.config, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.k_proj"]
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), tmp_path / "a").eval()
    assert "layers.0.self_attn.k_proj.lora_A" not in str(dict(peft_model.named_parameters()).keys())
    torch.testing.assert_close(hf_logits(peft_model), ours, rtol=0, atol=1e-4)
