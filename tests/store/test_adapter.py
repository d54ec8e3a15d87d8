"""Modelfile ADAPTER: a PEFT directory or GGUF LoRA file stacked on a base in `corral create`, applied by
`load_stored` (the path `corral run` and the server share), and merged out by `corral export --merge`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corral.checkpoint.adapter import adapter_of
from corral.checkpoint.export import export_with_llama3_tokenizer
from corral.checkpoint.gguf_lora import export_gguf_adapter
from corral.checkpoint.load import load_checkpoint
from corral.checkpoint.peft import save_peft_adapter
from corral.cli import main
from corral.errors import FormatError, UnknownFormatError
from corral.llm import build_model
from corral.model.lora import LoRALinear, apply_lora
from corral.store import Modelfile, create_model
from corral.store import manifest as mt
from corral.store.load import load_stored

TOKENS = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))


def lora_model(base: Path, seed: int = 1):
    """The base with a LoRA on every projection, B random (so the adapter changes the logits)."""
    ckpt = load_checkpoint(base)
    model = apply_lora(build_model(ckpt.config, ckpt.state_dict), rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """{"peft": dir, "gguf": file, "logits": the LoRA model's logits, "base_logits"} for the tiny Meta model."""
    root = tmp_path_factory.mktemp("adapters")
    model = lora_model(models["meta"])
    with torch.no_grad():
        logits = model(TOKENS)
    base = load_checkpoint(models["meta"])
    with torch.no_grad():
        base_logits = build_model(base.config, base.state_dict)(TOKENS)
    return {"peft": save_peft_adapter(adapter_of(model), model.config, root / "peft"),
            "gguf": export_gguf_adapter(adapter_of(model), root / "lora.gguf"),
            "logits": logits, "base_logits": base_logits}


def logits(llm) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(TOKENS)


@pytest.mark.parametrize("kind", ["peft", "gguf"])
def test_create_with_adapter_stores_a_gguf_lora_layer_and_load_merges_it(store, models, adapters, kind):
    manifest = create_model(store, "tuned", Modelfile(from_=str(models["meta"]), adapters=[str(adapters[kind])]))
    layer, = manifest.layers_of(mt.ADAPTER)
    assert layer.media_type == "application/vnd.ollama.image.adapter"
    assert store.blobs.path(layer.digest).read_bytes()[:4] == b"GGUF"  # a PEFT directory is converted, as Ollama does
    llm, info = load_stored(store, "tuned")
    assert info.adapters == [store.blobs.path(layer.digest)]
    assert not any(isinstance(m, LoRALinear) for m in llm.model.modules())  # float base: merged at load
    assert (adapters["logits"] - adapters["base_logits"]).abs().max() > 0.5
    torch.testing.assert_close(logits(llm), adapters["logits"], rtol=0, atol=1e-4)


def test_adapter_over_a_stored_name_keeps_the_base_unchanged(store, models, adapters):
    create_model(store, "base", Modelfile(from_=str(models["meta"])))
    create_model(store, "tuned", Modelfile(from_="base", adapters=[str(adapters["peft"])]))
    torch.testing.assert_close(logits(load_stored(store, "tuned")[0]), adapters["logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(load_stored(store, "base")[0]), adapters["base_logits"], rtol=0, atol=1e-5)


def test_adapter_over_a_quantized_gguf_base_runs_as_lora_layers(store, models, adapters, tmp_path):
    base = load_checkpoint(models["meta"])
    gguf = export_with_llama3_tokenizer(base.config, base.state_dict, tmp_path / "q8.gguf", "gguf", qtype="Q8_0")
    create_model(store, "q8", Modelfile(from_=str(gguf)))
    create_model(store, "q8-tuned", Modelfile(from_=str(gguf), adapters=[str(adapters["gguf"])]))
    plain, tuned = logits(load_stored(store, "q8")[0]), load_stored(store, "q8-tuned")[0]
    wq = tuned.model.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and not isinstance(wq.base, torch.nn.Linear)  # the blocks stay blocks
    # The adapter moves the Q8_0 model's logits as it moves the float model's (up to Q8_0 rounding).
    torch.testing.assert_close(logits(tuned) - plain, adapters["logits"] - adapters["base_logits"], rtol=0, atol=2e-2)


def test_adapter_for_another_base_is_refused_at_create_naming_the_tensor(store, models, tmp_path):
    adapter = adapter_of(lora_model(models["meta"]))
    adapter.tensors["layers.0.attention.wq.lora_a.weight"] = torch.zeros(4, 128)  # made for a dim-128 base
    path = export_gguf_adapter(adapter, tmp_path / "wide.gguf")
    with pytest.raises(FormatError, match=r"blk\.0\.attn_q\.weight\.lora_a.*\(4, 128\)"):
        create_model(store, "bad", Modelfile(from_=str(models["meta"]), adapters=[str(path)]))
    assert store.entries() == []


def test_adapter_that_is_no_adapter_is_refused_at_create(store, models, tmp_path):
    (tmp_path / "lora.safetensors").write_bytes(b"adapter bytes")
    with pytest.raises(UnknownFormatError):
        create_model(store, "lora", Modelfile(from_=str(models["meta"]), adapters=["lora.safetensors"]),
                     base_dir=tmp_path)
    with pytest.raises(FormatError, match="general.type"):  # a model file is not an adapter
        create_model(store, "lora", Modelfile(from_=str(models["meta"]), adapters=[str(models["gguf"])]))
    assert store.entries() == []


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_merge_writes_the_merged_model(store, models, adapters, tmp_path, capsys, fmt):
    create_model(store, "tuned", Modelfile(from_=str(models["meta"]), adapters=[str(adapters["peft"])]))
    out = tmp_path / ("merged.gguf" if fmt == "gguf" else "merged")
    assert main(["export", "tuned", str(out), "--format", fmt, "--merge"]) == 0
    merged = load_checkpoint(out)
    with torch.no_grad():
        got = build_model(merged.config, merged.state_dict)(TOKENS)
    torch.testing.assert_close(got, adapters["logits"], rtol=0, atol=1e-4)


def test_export_merge_without_adapters_is_one_line_error(store, models, tmp_path, capsys):
    create_model(store, "plain", Modelfile(from_=str(models["meta"])))
    assert main(["export", "plain", str(tmp_path / "x"), "--merge"]) == 1
    assert "no ADAPTER layers" in capsys.readouterr().err
