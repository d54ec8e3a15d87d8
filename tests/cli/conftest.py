import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))  # the tiny-model builders live beside the store tests

from store_fixtures import tiny_gguf, tiny_hf, tiny_meta  # noqa: E402


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("CORRAL_HOME", str(path))
    monkeypatch.delenv("CORRAL_HOST", raising=False)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    return {"gguf": tiny_gguf(root / "tiny.gguf"), "hf": tiny_hf(root / "hf"), "meta": tiny_meta(root / "meta")}
