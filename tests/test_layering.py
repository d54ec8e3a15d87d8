"""Imports run one way (DESIGN.md, docs/architecture.md) and the module graph has no cycle.

    server -> safety -> engine -> checkpoint -> model          posttrain -> train -> data -> tokenizer

MAY_IMPORT below is the whole rule: a package imports itself, the shared leaves `corral.errors` and
`corral.config`, and the packages its row names, nothing else. Imports are read from the source
(every `import`, `from ... import`, relative or `from corral import X`, at module level or inside a
function), so a lazy import inside a function still counts for the direction. Only module-level
imports count for cycles: those are the ones that run while a module is still half-initialised.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "corral"
STDLIB_OK = {"__future__", "math", "dataclasses", "typing", "collections", "functools", "itertools", "enum"}

SHARED = {"errors", "config"}  # every package may import these; they import no other corral module
_BELOW_ENGINE = {"model", "kernels", "tokenizer", "checkpoint"}
_INFERENCE = _BELOW_ENGINE | {"engine", "llm"}
# package (or top-level module) -> the corral packages it may import; every package has a row.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),  # the typed TOML loader every *Config uses (shared, like errors)
    "model": set(),
    "tokenizer": set(),
    "checkpoint": {"model", "tokenizer"},
    "kernels": {"model", "checkpoint"},  # the C kernels fall back to checkpoint's GGUF block decoders
    "engine": _BELOW_ENGINE,
    "llm": _BELOW_ENGINE | {"engine"},
    "embed": _INFERENCE,
    "store": _INFERENCE,
    "safety": _INFERENCE | {"store", "data"},
    "data": {"tokenizer"},
    "train": _INFERENCE | {"store", "data"},
    "eval": _INFERENCE | {"store", "data", "train"},
    "posttrain": _INFERENCE | {"store", "data", "train", "eval", "safety"},
    "bench": _INFERENCE | {"store", "data", "train", "embed"},
    "server": _INFERENCE | {"store", "safety", "embed"},
    "repl": _INFERENCE | {"store", "safety"},
    "cli": set(),  # filled below: the CLI may import anything
    "__main__": {"cli"},
    "__init__": set(),  # the package's lazy `_PUBLIC` names modules as strings, never imports them
}
MAY_IMPORT["cli"] = set(MAY_IMPORT) - {"cli", "__main__", "__init__"}


def _public_names() -> dict[str, str]:
    """corral/__init__.py's `_PUBLIC`: `from corral import load` imports corral.llm."""
    for node in ast.parse((ROOT / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_PUBLIC":
            return ast.literal_eval(node.value)
    raise AssertionError("corral/__init__.py has no _PUBLIC table")


PUBLIC = _public_names()


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ("corral", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path = ROOT) -> bool:
    rel = Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, root: Path) -> list[str]:
    """The modules an import statement loads (corral's own, resolved; others as written)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: `from . import x` in corral/a/b.py means corral.a.x
        base = importer.split(".")[: len(importer.split(".")) - (node.level - (1 if is_package else 0))]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module.split(".")[0] != "corral":
        return [module]
    out = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        if _is_module(sub, root):
            out.append(sub)
        elif module == "corral" and alias.name in PUBLIC:
            out.append(PUBLIC[alias.name])
        else:
            out.append(module)
    return out


def _attribute_targets(tree: ast.AST) -> list[str]:
    """`import corral` then `corral.load(...)`: the attribute names the module it loads."""
    return [PUBLIC[n.attr] for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "corral" and n.attr in PUBLIC]


def imports(path: Path, *, module_level_only: bool = False, root: Path = ROOT) -> set[str]:
    tree = ast.parse(path.read_text())
    importer, is_package = module_name(path, root), path.name == "__init__.py"
    names: set[str] = set()
    if module_level_only:
        stack = list(tree.body)
        while stack:  # statements that run at import: module body, if/try/with blocks, class bodies
            node = stack.pop()
            if isinstance(node, ast.Import | ast.ImportFrom):
                names.update(_targets(node, importer, is_package, root))
            elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                stack.extend(node.orelse)
            elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                stack.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))
        return names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update(_targets(node, importer, is_package, root))
    return names | set(_attribute_targets(tree))


def modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def test_every_package_has_a_row():
    missing = {package_of(p) for p in modules()} - set(MAY_IMPORT)
    assert not missing, f"add {sorted(missing)} to MAY_IMPORT in tests/test_layering.py"


def test_the_table_itself_runs_one_way():
    """The rows form no cycle, and the named directions hold in them."""
    def reaches(src: str, dst: str, seen=()) -> bool:
        return any(n == dst or (n not in seen and reaches(n, dst, (*seen, n))) for n in MAY_IMPORT[src])

    for chain in (("server", "safety", "engine", "checkpoint", "model"), ("posttrain", "train", "data", "tokenizer")):
        for upper, lower in zip(chain, chain[1:], strict=False):
            assert reaches(upper, lower) and not reaches(lower, upper), (upper, lower)
    for package in MAY_IMPORT:
        assert not reaches(package, package), f"{package} reaches itself through MAY_IMPORT"
        if package not in ("cli", "__main__"):
            assert not {"server", "cli", "repl"} & MAY_IMPORT[package], package


def violations(path: Path, root: Path = ROOT) -> list[str]:
    package = path.relative_to(root).parts[0].removesuffix(".py")
    allowed = {package} | SHARED | MAY_IMPORT.get(package, set())
    return sorted(n for n in imports(path, root=root) if n.split(".")[0] == "corral" and len(n.split(".")) > 1
                  and n.split(".")[1] not in allowed)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    assert not violations(path), f"{path.relative_to(ROOT)} imports {violations(path)}"


def test_an_upward_import_is_caught(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "probe.py").write_text("from corral.model import llama\nfrom corral.repl import answer\n")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "probe.py").write_text("def f():\n    from corral.server import pool\n")
    assert violations(tmp_path / "engine" / "probe.py", tmp_path) == ["corral.repl"]
    assert violations(tmp_path / "store" / "probe.py", tmp_path) == ["corral.server"]


def test_relative_and_package_imports_are_resolved(tmp_path):
    """The rules see through `from corral import X`, `corral.load(...)` and relative imports."""
    for folder in ("engine", "server"):
        (tmp_path / folder).mkdir()
    (tmp_path / "cli.py").write_text("")
    (tmp_path / "server" / "app.py").write_text("")
    probe = tmp_path / "engine" / "probe.py"
    probe.write_text("import corral\nfrom corral import load, cli\nfrom ..server import app\nfrom . import x\n"
                     "def f():\n    import corral.store\n    return corral.load()\n")
    found = imports(probe, root=tmp_path)
    assert {"corral.llm", "corral.cli", "corral.server.app", "corral.engine", "corral.store"} <= found
    assert "corral.store" not in imports(probe, root=tmp_path, module_level_only=True)  # inside a function


@pytest.mark.parametrize("path", sorted((ROOT / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_imports_only_torch(path):
    for name in imports(path):
        top = name.split(".")[0]
        assert top in {"torch", "corral"} | STDLIB_OK, f"{path.name} imports {name}"
        if top == "corral":
            assert name.startswith(("corral.model", "corral.errors")), f"{path.name} imports {name}"


def test_model_code_has_no_device_strings():
    for path in (ROOT / "model").glob("*.py"):
        text = path.read_text()
        for bad in ('"cuda"', "'cuda'", ".cuda(", '"cpu"', "'cpu'"):
            assert bad not in text, f"{path.name} contains {bad}"


# -- cycles -----------------------------------------------------------------------------------------
def import_graph() -> dict[str, set[str]]:
    """corral module -> the corral modules its module-level imports run, with the packages above them
    (importing corral.a.b runs corral/a/__init__.py first), except packages the importer sits in."""
    graph: dict[str, set[str]] = {}
    for path in modules():
        importer = module_name(path)
        edges = graph.setdefault(importer, set())
        for name in imports(path, module_level_only=True):
            parts = name.split(".")
            if parts[0] != "corral":
                continue
            for i in range(2, len(parts) + 1):
                target = ".".join(parts[:i])
                if _is_module(target) and target != importer and not importer.startswith(target + "."):
                    edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected group of modules (Tarjan, then BFS)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for group in groups:
        start = min(group)
        paths, queue = {start: [start]}, [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v] & group):
                if w == start:
                    found.append(paths[v] + [start])
                    queue = []
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]


def test_module_level_imports_form_no_cycle():
    found = cycles(import_graph())
    assert not found, "module-level import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)
