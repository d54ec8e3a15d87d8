"""llama.cpp GGUF LoRA files: Corral writes and reads them; gguf-py reads ours; a PEFT adapter converts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from corral.checkpoint.adapter import adapter_of, apply_adapter, detect_adapter_format, load_adapter
from corral.checkpoint.gguf_lora import export_gguf_adapter, load_gguf_adapter
from corral.errors import FormatError, UnknownFormatError
from corral.model.config import PRESETS
from corral.model.llama import Transformer, init_weights_
from corral.model.lora import BLOCK_TARGETS, LoRALinear, apply_lora

TINY = dataclasses.replace(PRESETS["debug"], n_layers=2, vocab_size=512, max_seq_len=64)
TOKENS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))


def tiny_model(config=TINY) -> Transformer:
    torch.manual_seed(0)
    return init_weights_(Transformer(config)).eval()


def trained_lora(targets=(*BLOCK_TARGETS, "output"), rank=4, alpha=8.0) -> Transformer:
    model = apply_lora(tiny_model(), targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.1)
    return model


def test_gguf_adapter_round_trip_gives_same_logits(tmp_path):
    model = trained_lora()
    with torch.no_grad():
        expected = model(TOKENS)
    path = export_gguf_adapter(adapter_of(model), tmp_path / "lora.gguf")
    assert detect_adapter_format(path) == "gguf"
    adapter = load_adapter(path, TINY)
    assert adapter.format == "gguf" and set(adapter.alphas.values()) == {8.0}
    with torch.no_grad():
        torch.testing.assert_close(apply_adapter(tiny_model(), adapter)(TOKENS), expected, rtol=0, atol=1e-6)


def test_gguf_adapter_keys_and_shapes_are_llama_cpp_convention(tmp_path):
    path = export_gguf_adapter(adapter_of(trained_lora(["attention.wq", "feed_forward.w2"], rank=4)),
                               tmp_path / "lora.gguf")
    reader = GGUFReader(path)  # gguf-py's reader, not ours
    fields = {f.name: f for f in reader.fields.values()}
    text = {k: bytes(fields[k].parts[-1]).decode() for k in ("general.type", "adapter.type", "general.architecture")}
    assert text == {"general.type": "adapter", "adapter.type": "lora", "general.architecture": "llama"}
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    ne = {t.name: [int(d) for d in t.shape] for t in reader.tensors}  # ggml order: ne[0] first
    dim, hidden = TINY.dim, TINY.hidden_dim
    assert ne["blk.1.attn_q.weight.lora_a"] == [dim, 4] and ne["blk.1.attn_q.weight.lora_b"] == [4, dim]
    assert ne["blk.0.ffn_down.weight.lora_a"] == [hidden, 4] and ne["blk.0.ffn_down.weight.lora_b"] == [4, dim]
    assert len(ne) == 2 * 2 * TINY.n_layers


def test_gguf_adapter_folds_differing_alphas_into_b(tmp_path):
    model = trained_lora(["attention.wv"], rank=4, alpha=8.0)
    model.layers[1].attention.wv.alpha, model.layers[1].attention.wv.scale = 2.0, 0.5
    with torch.no_grad():
        expected = model(TOKENS)
    path = export_gguf_adapter(adapter_of(model), tmp_path / "lora.gguf")
    with torch.no_grad():
        ours = apply_adapter(tiny_model(), load_gguf_adapter(path, TINY))(TOKENS)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_gguf_adapter_for_another_base_raises_format_error_naming_tensor(tmp_path):
    path = export_gguf_adapter(adapter_of(trained_lora(["feed_forward.w1"])), tmp_path / "lora.gguf")
    wider = dataclasses.replace(TINY, dim=TINY.dim * 2)
    with pytest.raises(FormatError, match=r"blk\.0\.ffn_gate\.weight\.lora_a.*does not fit"):
        load_gguf_adapter(path, wider)


def test_gguf_model_file_is_not_an_adapter(tmp_path):
    from corral.checkpoint.gguf_write import export_gguf

    path = export_gguf(TINY, tiny_model().state_dict(), tmp_path / "model.gguf")
    with pytest.raises(FormatError, match="general.type"):
        load_adapter(path, TINY)


def test_adapter_of_unknown_content_raises_unknown_format_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(np.arange(16, dtype=np.uint8).tobytes())
    with pytest.raises(UnknownFormatError):
        load_adapter(tmp_path / "x.bin", TINY)
    with pytest.raises(UnknownFormatError, match="adapter_config.json"):
        load_adapter(tmp_path, TINY)
