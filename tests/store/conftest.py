import pytest
from store_fixtures import tiny_gguf, tiny_hf, tiny_meta

from corral.store import Store


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("CORRAL_HOME", str(path))
    return path


@pytest.fixture
def store(home):
    return Store(home)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """One tiny model per format, built once: {"gguf": file, "hf": dir, "meta": dir}."""
    root = tmp_path_factory.mktemp("models")
    return {"gguf": tiny_gguf(root / "tiny.gguf"), "hf": tiny_hf(root / "hf"), "meta": tiny_meta(root / "meta")}
