"""Imports run one way (DESIGN.md): the model knows only torch; nothing imports the CLI or the server."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "corral"
STDLIB_OK = {"__future__", "math", "dataclasses", "typing", "collections", "functools", "itertools", "enum"}

# package -> corral packages it must never import
FORBIDDEN = {
    "model": {"checkpoint", "tokenizer", "engine", "llm", "cli", "server", "store", "train"},
    "tokenizer": {"checkpoint", "engine", "llm", "cli", "server", "store", "train"},
    "checkpoint": {"engine", "llm", "cli", "server", "store"},
    "engine": {"llm", "cli", "server", "store"},
    "embed": {"cli", "server", "store", "train"},
}


def corral_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules():
    return sorted(p for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    package = path.relative_to(ROOT).parts[0].removesuffix(".py")
    for name in corral_imports(path):
        parts = name.split(".")
        if parts[0] != "corral" or len(parts) < 2:
            continue
        assert parts[1] not in FORBIDDEN.get(package, set()), f"{path.name} imports {name}"
        if path.stem not in ("cli", "__main__"):
            outside = {"cli"} if package == "server" else {"cli", "server"}  # the server's modules use each other
            assert parts[1] not in outside, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((ROOT / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_imports_only_torch(path):
    for name in corral_imports(path):
        top = name.split(".")[0]
        assert top in {"torch", "corral"} | STDLIB_OK, f"{path.name} imports {name}"
        if top == "corral":
            assert name.startswith(("corral.model", "corral.errors")), f"{path.name} imports {name}"


def test_model_code_has_no_device_strings():
    for path in (ROOT / "model").glob("*.py"):
        text = path.read_text()
        for bad in ('"cuda"', "'cuda'", ".cuda(", '"cpu"', "'cpu'"):
            assert bad not in text, f"{path.name} contains {bad}"
