"""The same random weights written as HF, Meta and GGUF load back to the same logits."""

import pytest
import torch

from corral.checkpoint.export import export_checkpoint
from corral.checkpoint.load import detect_format, load_checkpoint
from corral.llm import build_model
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_


@pytest.fixture(scope="module", params=["plain", "scaled_tied"])
def reference(request):
    extra = dict(use_scaled_rope=True, tie_embeddings=True, max_seq_len=131072) if request.param != "plain" else {}
    config = ModelConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32, **extra)
    torch.manual_seed(0)
    model = init_weights_(Transformer(config)).eval()
    return config, model


def logits(model, seed=0):
    tokens = torch.randint(0, model.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("fmt,qtype,tol", [("meta", "F32", 0.0), ("hf", "F32", 0.0), ("gguf", "F32", 0.0),
                                           ("gguf", "F16", 2e-2), ("gguf", "Q8_0", 5e-2)])
def test_export_then_load_gives_same_logits(reference, tmp_path, fmt, qtype, tol):
    config, model = reference
    dest = tmp_path / ("model.gguf" if fmt == "gguf" else "model")
    export_checkpoint(config, model.state_dict(), dest, fmt, qtype=qtype)
    assert detect_format(dest) == fmt
    ckpt = load_checkpoint(dest, dtype=torch.float32)
    assert ckpt.config.tie_embeddings == config.tie_embeddings
    assert ckpt.config.use_scaled_rope == config.use_scaled_rope
    diff = (logits(build_model(ckpt.config, ckpt.state_dict)) - logits(model)).abs().max().item()
    assert diff <= tol, f"{fmt}/{qtype}: max |diff| {diff}"


def test_meta_and_gguf_copies_give_identical_logits(reference, tmp_path):
    config, model = reference
    export_checkpoint(config, model.state_dict(), tmp_path / "meta", "meta")
    export_checkpoint(config, model.state_dict(), tmp_path / "m.gguf", "gguf", qtype="F32")
    a = load_checkpoint(tmp_path / "meta", dtype=torch.float32)
    b = load_checkpoint(tmp_path / "m.gguf", dtype=torch.float32)
    assert a.config.hidden_dim == b.config.hidden_dim
    assert torch.equal(logits(build_model(a.config, a.state_dict), 3), logits(build_model(b.config, b.state_dict), 3))


def test_unknown_export_format_is_a_clean_error(reference, tmp_path):
    from corral.errors import CorralError

    config, model = reference
    with pytest.raises(CorralError, match="unknown export format"):
        export_checkpoint(config, model.state_dict(), tmp_path / "x", "onnx")
    with pytest.raises(CorralError, match="Q4_K"):
        export_checkpoint(config, model.state_dict(), tmp_path / "x.gguf", "gguf", qtype="Q4_K")
