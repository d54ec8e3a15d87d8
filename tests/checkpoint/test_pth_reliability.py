"""RELIABILITY.md 8 and 10 for Meta .pth shards: a pickle that would run code is refused before it
runs, and random mutations of a small valid shard give only FormatError or a clean load."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from mutations import mutated_bytes

from corral.checkpoint.base import weight_shapes
from corral.checkpoint.meta import export_meta, load_meta, read_pth
from corral.errors import FormatError
from corral.model.config import ModelConfig

TINY = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, multiple_of=8, max_seq_len=32)


class WritesMarker:
    """Unpickling this runs ``exec``, which creates the marker file: the attack item 8 describes."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in weight_shapes(TINY).items()}


def _meta_dir(directory: Path, payload: object, **save_kwargs) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(TINY.to_params()))
    torch.save(payload, directory / "consolidated.00.pth", **save_kwargs)
    return directory


def test_malicious_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    # The control: proves the payload used below is live, so its refusal means something.
    marker = tmp_path / "marker"
    path = _meta_dir(tmp_path / "m", {"tok_embeddings.weight": torch.zeros(2), "x": WritesMarker(marker)})
    torch.load(path / "consolidated.00.pth", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("wrap", [
    lambda evil: dict(_tiny_state(), **{"evil": evil}),  # hidden among real tensors
    lambda evil: evil,  # the whole pickle
    lambda evil: {"layers.0.attention.wq.weight": [evil]},  # nested inside a container
])
def test_load_meta_refuses_pickle_that_would_run_code(tmp_path, wrap):
    marker = tmp_path / "marker"
    path = _meta_dir(tmp_path / "m", wrap(WritesMarker(marker)))
    with pytest.raises(FormatError, match="refused or unreadable pickle") as info:
        load_meta(path)
    assert info.value.path == str(path / "consolidated.00.pth")
    assert not marker.exists()


def test_load_meta_refuses_legacy_and_raw_pickles_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    legacy = _meta_dir(tmp_path / "legacy", {"evil": WritesMarker(marker)}, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError):
        load_meta(legacy)
    raw = _meta_dir(tmp_path / "raw", {})
    (raw / "consolidated.00.pth").write_bytes(pickle.dumps({"evil": WritesMarker(marker)}))
    with pytest.raises(FormatError):
        load_meta(raw)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 1, 30, 200, -1])
def test_read_pth_refuses_truncated_shard(tmp_path, cut):
    path = _meta_dir(tmp_path, _tiny_state()) / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[: len(data) // 2])
    with pytest.raises(FormatError):
        read_pth(path)


def _valid_shard() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        export_meta(TINY, _tiny_state(), d)
        return (Path(d) / "consolidated.00.pth").read_bytes()


VALID = _valid_shard()
PARAMS = json.dumps(TINY.to_params())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes a mutated protocol byte
@settings(max_examples=1000, deadline=1000)
@given(content=mutated_bytes(VALID))
def test_mutated_pth_gives_only_format_error(content):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "params.json").write_text(PARAMS)
        (Path(d) / "consolidated.00.pth").write_bytes(content)
        start = time.perf_counter()
        try:
            ckpt = load_meta(d)
        except FormatError as exc:
            assert exc.path is not None
        else:
            assert {k: tuple(t.shape) for k, t in ckpt.state_dict.items()} == weight_shapes(TINY)
            for t in ckpt.state_dict.values():
                t.sum()  # every mapped page is readable
        assert time.perf_counter() - start < 1.0
        assert sorted(os.listdir(d)) == ["consolidated.00.pth", "params.json"]
