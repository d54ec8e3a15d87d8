"""Issue 14 item 3 (RELIABILITY.md 40): a config whose shape asks for more than its weights hold is refused
before anything is allocated per layer, in the HF and Meta loaders, in `corral generate`, and by a load
without weights (what the store runs before registering a model)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from corral.checkpoint.base import weight_shapes
from corral.checkpoint.export import export_checkpoint
from corral.checkpoint.load import load_checkpoint
from corral.errors import FormatError
from corral.model.config import ModelConfig

ROOT = Path(__file__).parents[2]
TINY = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=32, multiple_of=8, max_seq_len=64)
# 200,000 layers listed 1.8 M expected names (hundreds of MB) before the fix; 10**9 is the config.
DEPTHS = [200_000, 10**9]


def _state():
    import torch

    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in weight_shapes(TINY).items()}


def _with_depth(tmp_path: Path, fmt: str, depth: int) -> Path:
    path = export_checkpoint(TINY, _state(), tmp_path / fmt, fmt)
    name, key = ("config.json", "num_hidden_layers") if fmt == "hf" else ("params.json", "n_layers")
    config = json.loads((path / name).read_text())
    config[key] = depth
    (path / name).write_text(json.dumps(config))
    return path


def _load_small_and_fast(path: Path, weights: bool) -> FormatError:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(FormatError) as info:
            load_checkpoint(path, weights=weights)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB traced before refusing"
    return info.value


@pytest.mark.parametrize("weights", [True, False], ids=["load", "headers-only"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_config_asking_for_more_layers_than_the_weights_hold_is_refused_before_allocating(tmp_path, fmt, depth,
                                                                                           weights):
    """Item 3: num_hidden_layers / n_layers of 10^9 over a 2-layer checkpoint -> FormatError naming the field."""
    error = _load_small_and_fast(_with_depth(tmp_path, fmt, depth), weights)
    assert error.field == ("num_hidden_layers" if fmt == "hf" else "n_layers")
    assert f"{depth} layers need more than" in str(error)


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_config_with_fewer_layers_than_the_files_hold_names_the_extra_layer(tmp_path, fmt):
    """Item 3: no layer index beyond what the config declares: a 1-layer config over 2 layers' weights."""
    with pytest.raises(FormatError, match="unexpected tensors") as info:
        load_checkpoint(_with_depth(tmp_path, fmt, 1), weights=False)
    assert "layers.1." in info.value.field


def test_headers_only_load_checks_every_tensor_shape_without_reading_weights(tmp_path):
    """Item 3: the store's check sees a tensor whose shape contradicts config.json."""
    from corral.checkpoint.safetensors_io import read_safetensors, write_safetensors

    path = export_checkpoint(TINY, _state(), tmp_path / "hf", "hf")
    tensors = read_safetensors(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:8].clone()
    write_safetensors(tensors, path / "model.safetensors", {"format": "pt"})
    with pytest.raises(FormatError, match="does not match the config") as info:
        load_checkpoint(path, weights=False)
    assert info.value.field == "norm.weight"
    good = export_checkpoint(TINY, _state(), tmp_path / "good", "hf")
    ckpt = load_checkpoint(good, weights=False)
    assert ckpt.config.n_layers == 2 and all(t.is_meta for t in ckpt.state_dict.values())


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_generate_refuses_a_billion_layer_config_in_one_line(tmp_path, fmt):
    """Item 3: `corral generate` on the issue's config: exit 1, one line naming the field, no 22 GB."""
    path = _with_depth(tmp_path, fmt, 10**9)
    proc = subprocess.run([sys.executable, "-m", "corral", "generate", str(path), "hi"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.startswith("corral: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert ("num_hidden_layers" if fmt == "hf" else "n_layers") in proc.stderr
