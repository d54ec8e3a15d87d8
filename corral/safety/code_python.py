"""Python syntax-tree rules: a `call` rule names the callees it watches and what makes a call bad.

    [[rule]]
    id = "python-subprocess-shell"
    call = ["subprocess.run", "subprocess.Popen"]   # fnmatch globs over the callee's dotted name,
                                                    # after `import x as y` / `from x import y` aliases
    receiver = '''(?i)cur|conn|db'''                # optional: for "*.execute", the receiver's text
    arg_index = 0                                   # the argument judged by `when` (or arg_keyword = "args")
    when = "nonliteral"                             # nonliteral | literal | built | any
    keywords = { shell = true }                     # each keyword passed with this value (a string: a regex
                                                    # over the value's source, e.g. Loader = "yaml\\.Loader")
    absent = ["Loader"]                             # ... and none of these keywords passed

An argument is *literal* when its value is known from the snippet alone: a constant, a string built
only from constants, an ALL_CAPS name, or a name every assignment in the snippet gives a literal.
It is *built* when it is a string made with %, +, f"" or .format from something that is not
literal (also through one assignment). Anything else (a parameter, an attribute) is *nonliteral*
but not built. Model output is often a fragment, so the parse is forgiving (see `parse`).
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator

from corral.safety.code_rules import Rule

MAX_RECOVERIES = 20  # lines skipped to get past syntax errors before the tree rules give up


def parse(code: str) -> list[tuple[ast.AST, int]]:
    """(tree, line offset) pieces of a snippet: the whole of it when it parses, else the runs of lines
    between syntax errors (each error's line is dropped and parsing resumes after it, at most
    MAX_RECOVERIES times, so a long unparseable text costs a bounded number of parses)."""
    lines = textwrap.dedent(code).splitlines()
    pieces, start = [], 0
    for _ in range(MAX_RECOVERIES + 1):
        if start >= len(lines):
            break
        chunk = textwrap.dedent("\n".join(lines[start:]))
        try:
            pieces.append((ast.parse(chunk), start))
            break
        except SyntaxError as exc:
            bad = start + max((exc.lineno or 1) - 1, 0)
            head = textwrap.dedent("\n".join(lines[start:bad]))
            try:
                if head.strip():
                    pieces.append((ast.parse(head), start))
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                pass
            start = bad + 1
        except (ValueError, RecursionError, MemoryError):  # NUL bytes, absurd nesting
            break
    return pieces


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else f"?.{node.attr}"
    if isinstance(node, ast.Call):  # Runtime-like chains: a().b -> a().b
        base = _dotted(node.func)
        return f"{base}()" if base else None
    return None


class Scope:
    """What a snippet's imports and assignments tell about its names."""

    def __init__(self, tree: ast.AST):
        self.aliases: dict[str, str] = {}
        self.assigned: dict[str, list[ast.AST]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self.assigned.setdefault(t.id, []).append(node.value)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) \
                    and node.value is not None:
                value = node.value if isinstance(node, ast.AnnAssign) else ast.BinOp(node.target, node.op, node.value)
                self.assigned.setdefault(node.target.id, []).append(value)

    def resolve(self, dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    def kind(self, node: ast.AST, depth: int = 0) -> str:
        """literal | built | unknown (see the module docstring)."""
        if isinstance(node, ast.Constant):
            return "literal"
        if isinstance(node, ast.Name):
            if node.id.isupper() and len(node.id) > 1:
                return "literal"
            values = self.assigned.get(node.id, [])
            if not values or depth >= 3:
                return "unknown"
            kinds = {self.kind(v, depth + 1) for v in values if v is not node}
            return "built" if "built" in kinds else "literal" if kinds == {"literal"} else "unknown"
        if isinstance(node, ast.JoinedStr):
            return "built" if any(isinstance(v, ast.FormattedValue) and self.kind(v.value, depth + 1) != "literal"
                                  for v in node.values) else "literal"
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
            parts = {self.kind(node.left, depth + 1), self.kind(node.right, depth + 1)}
            return "literal" if parts == {"literal"} else "built" if _stringish(node) else "unknown"
        if isinstance(node, (ast.Tuple, ast.List)):
            kinds = {self.kind(e, depth + 1) for e in node.elts}
            return "literal" if kinds <= {"literal"} else "built" if "built" in kinds else "unknown"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join"):
            args = [*node.args, *(k.value for k in node.keywords)]
            return "literal" if all(self.kind(a, depth + 1) == "literal" for a in args) else "built"
        return "unknown"


def _stringish(node: ast.BinOp) -> bool:
    """A % or + that builds a string: one side is a string constant or an f-string, or a .format()."""
    sides = (node.left, node.right)
    return any(isinstance(s, ast.JoinedStr) or (isinstance(s, ast.Constant) and isinstance(s.value, str))
               or (isinstance(s, ast.BinOp) and _stringish(s)) for s in sides)


def _callee_matches(rule: Rule, call: ast.Call, name: str) -> bool:
    if not rule.callee.match(name):
        return False
    if rule.receiver is not None:
        receiver = ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""
        return rule.receiver.search(receiver) is not None
    return True


def _keyword_matches(value: ast.AST, want) -> bool:
    if isinstance(want, str):
        return re.fullmatch(want, ast.unparse(value)) is not None
    return isinstance(value, ast.Constant) and value.value == want and type(value.value) is type(want)


def _judged_arg(rule: Rule, call: ast.Call) -> ast.AST | None:
    if rule.arg_keyword is not None:
        for k in call.keywords:
            if k.arg == rule.arg_keyword:
                return k.value
    if rule.arg_index is not None and rule.arg_index < len(call.args):
        arg = call.args[rule.arg_index]
        return None if isinstance(arg, ast.Starred) else arg
    return None


def call_matches(rule: Rule, call: ast.Call, scope: Scope, name: str) -> bool:
    """Does `call` (whose callee resolves to the dotted `name`) break `rule`?"""
    if not _callee_matches(rule, call, name):
        return False
    passed = {k.arg: k.value for k in call.keywords if k.arg is not None}
    if any(name in passed for name in rule.absent):
        return False
    if not all(key in passed and _keyword_matches(passed[key], want) for key, want in rule.keywords.items()):
        return False
    if rule.when == "any":
        return True
    arg = _judged_arg(rule, call)
    if arg is None:
        return False  # nothing to judge: eval() with no argument is not a finding
    kind = scope.kind(arg)
    return {"literal": kind == "literal", "built": kind == "built", "nonliteral": kind != "literal"}[rule.when]


def tree_findings(code: str, rules: list[Rule]) -> Iterator[tuple[Rule, int]]:
    """(rule, 1-based line) for every call a `call` rule flags."""
    call_rules = [r for r in rules if r.call]
    if not call_rules:
        return
    for tree, offset in parse(code):
        scope = Scope(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (dotted := _dotted(node.func)) is not None:
                name = scope.resolve(dotted)  # once per call, then one compiled match per rule
                for rule in call_rules:
                    if call_matches(rule, node, scope, name):
                        yield rule, node.lineno + offset
