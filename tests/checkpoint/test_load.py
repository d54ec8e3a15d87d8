"""Format detection reads content, never file names, and refuses what it cannot read with a typed error."""

import json
import os
import shutil

import pytest
import torch

from corral.checkpoint.export import export_checkpoint
from corral.checkpoint.load import detect_format, load_checkpoint
from corral.errors import FormatError, ModelNotFoundError, UnknownFormatError
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16)
    torch.manual_seed(0)
    sd = init_weights_(Transformer(config)).state_dict()
    for fmt, dest in (("gguf", root / "m.gguf"), ("hf", root / "hf"), ("meta", root / "meta")):
        export_checkpoint(config, sd, dest, fmt)
    return root


def test_gguf_detected_by_magic_whatever_its_name(tiny, tmp_path):
    renamed = tmp_path / "weights.safetensors"
    shutil.copy(tiny / "m.gguf", renamed)
    assert detect_format(renamed) == "gguf"
    assert load_checkpoint(renamed).format == "gguf"


def test_directory_with_one_gguf_file_loads_it(tiny, tmp_path):
    shutil.copy(tiny / "m.gguf", tmp_path / "model.bin")
    assert detect_format(tmp_path) == "gguf"


def test_directory_with_two_gguf_files_asks_which(tiny, tmp_path):
    shutil.copy(tiny / "m.gguf", tmp_path / "a.gguf")
    shutil.copy(tiny / "m.gguf", tmp_path / "b.gguf")
    with pytest.raises(UnknownFormatError, match="2 GGUF files"):
        detect_format(tmp_path)


def test_hf_and_meta_directories_detected(tiny):
    assert detect_format(tiny / "hf") == "hf"
    assert detect_format(tiny / "meta") == "meta"


def test_lone_weight_files_point_at_their_directory(tiny):
    with pytest.raises(UnknownFormatError, match="config.json"):
        detect_format(next((tiny / "hf").glob("*.safetensors")))
    with pytest.raises(UnknownFormatError, match="params.json"):
        detect_format(next((tiny / "meta").glob("*.pth")))


def test_text_file_and_empty_directory_are_refused(tmp_path):
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(UnknownFormatError, match="not a GGUF file"):
        detect_format(tmp_path / "notes.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownFormatError, match="no GGUF file"):
        detect_format(tmp_path / "empty")


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_checkpoint(tmp_path / "nope")


def test_hf_directory_with_corrupt_config_is_format_error(tiny, tmp_path):
    shutil.copytree(tiny / "hf", tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="JSON"):
        load_checkpoint(tmp_path / "hf")


def test_exported_files_get_ordinary_permissions(tiny):
    # Written through a temp file and a rename, but readable like any file the user creates (not mkstemp's 0600).
    umask = os.umask(0)
    os.umask(umask)
    files = [tiny / "m.gguf", *(tiny / "hf").iterdir(), *(tiny / "meta").iterdir()]
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}
    assert not [f for f in tiny.rglob(".*.tmp")]


def test_meta_checkpoint_without_output_weight_loads_as_tied(tmp_path):
    from corral.checkpoint.meta import export_meta

    config = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                         tie_embeddings=True)
    export_meta(config, init_weights_(Transformer(config)).state_dict(), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["tie_embeddings"]  # as in Meta's own params.json, which has no such field
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert load_checkpoint(tmp_path).config.tie_embeddings
