"""Code Shield's rules, kept as data: one TOML file per language under corral/safety/rules/.

    [[rule]]
    id = "c-strcpy"                 # unique across all files
    cwe = "CWE-120"
    severity = "error"              # error: the server blocks it; warning: the server warns
    message = "strcpy does not bound the copy to the destination's size"
    regex = '''\\bstrcpy\\s*\\('''    # a regex rule ...
    view = "code"                   # ... run on: code (comments and string contents blanked) | text (comments only)
    unless = '''...'''              # optional: no finding when this matches anywhere in the snippet (same view)
    arg = "a"                       # a named group of `regex` (default: the group named a, if any) that must be ...
    when = "nonliteral"             # ... nonliteral (default) | literal (see code_scan.literal_text)
    needs = ["strcpy"]              # optional: strings one of which every match contains (derived from the
                                    # regex when it starts with literals); a snippet without any is skipped

A Python file may also hold syntax-tree rules: `call` instead of `regex` (see code_python.py).

Every regex is checked at load so that no rule can take super-linear time: repeats are bounded
(`{0,200}`, not `*`) except over whitespace or one literal character, no repeat nests another, and
no pattern starts with a repeat. A file that breaks any of this is refused with its name and the
rule's id (RuleFileError), never loaded half.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from corral.errors import RuleFileError

try:  # the regex parser moved in 3.11; both names are CPython's own
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

RULES_DIR = Path(__file__).parent / "rules"
SEVERITIES = ("error", "warning")
VIEWS = ("code", "text")
WHEN = ("nonliteral", "literal", "built", "any")
MAX_BOUND = 1000
# language -> the rule files it runs besides its own (not transitive): C++ is mostly C, and
# common.toml (secrets in code) applies to every language.
INHERITS: dict[str, tuple[str, ...]] = {
    "c": ("common",), "cpp": ("c", "common"), "csharp": ("common",), "java": ("common",),
    "javascript": ("common",), "php": ("common",), "python": ("common",), "rust": ("common",),
}

_REGEX_KEYS = {"regex", "view", "unless", "arg", "when", "needs"}
_CALL_KEYS = {"call", "receiver", "arg_index", "arg_keyword", "when", "keywords", "absent"}
_COMMON_KEYS = {"id", "cwe", "severity", "message"}


@dataclass(frozen=True)
class Rule:
    id: str
    cwe: str
    severity: str
    message: str
    language: str
    regex: re.Pattern | None = None
    view: str = "code"
    unless: re.Pattern | None = None
    arg: str | None = None
    when: str = "nonliteral"
    call: tuple[str, ...] = ()
    """Python syntax-tree rule: dotted callee names (fnmatch globs after import aliases are resolved)."""
    callee: re.Pattern | None = None
    """`call` as one compiled pattern (the globs, fnmatch-translated and alternated)."""
    receiver: re.Pattern | None = None
    arg_index: int | None = None
    arg_keyword: str | None = None
    keywords: dict = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    anchors: tuple[str, ...] | None = None
    """Literal strings one of which every match of `regex` contains (None: not known). A text holding
    none of them is skipped with a substring search instead of running the regex over it."""


def _repeat_problem(items, nested: bool = False) -> str | None:
    """Why a parsed pattern could backtrack without bound (None when it cannot)."""
    for op, av in items:
        if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            lo, hi, body = av
            if hi == sre_constants.MAXREPEAT and not _narrow(body):
                return "an unbounded repeat over more than whitespace or one character (write {0,N})"
            if hi != sre_constants.MAXREPEAT and hi > MAX_BOUND:
                return f"a repeat bound over {MAX_BOUND}"
            if nested and hi > 1:
                return "a repeat inside a repeat"
            if (why := _repeat_problem(body, nested or hi > 1)) is not None:
                return why
        elif op == sre_constants.SUBPATTERN:
            if (why := _repeat_problem(av[-1], nested)) is not None:
                return why
        elif op == sre_constants.BRANCH:
            for branch in av[1]:
                if (why := _repeat_problem(branch, nested)) is not None:
                    return why
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            if (why := _repeat_problem(av[1], nested)) is not None:
                return why
    return None


def _narrow(body) -> bool:
    """A repeat body cheap to run unbounded: one literal, or a class of whitespace / a few literals."""
    if len(body) != 1:
        return False
    op, av = body[0]
    if op == sre_constants.LITERAL:
        return True
    if op == sre_constants.IN:
        return all(o == sre_constants.LITERAL or (o == sre_constants.CATEGORY and av_ == sre_constants.CATEGORY_SPACE)
                   for o, av_ in av)
    return False


def _anchors(items) -> tuple[str, ...] | None:
    """The literal runs a pattern must start with, after any \\b or lookbehind; None when it has none
    (a class, a repeat, case-insensitive parts)."""
    items = list(items)
    while items and items[0][0] in (sre_constants.AT, sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        items.pop(0)
    if not items:
        return None
    op, av = items[0]
    if op == sre_constants.LITERAL:
        run = ""
        for o, a in items:
            if o != sre_constants.LITERAL:
                break
            run += chr(a)
        return (run,)
    if op == sre_constants.BRANCH:
        out: list[str] = []
        for branch in av[1]:
            if (sub := _anchors(branch)) is None:
                return None
            out += sub
        return tuple(out)
    if op == sre_constants.SUBPATTERN and not (av[1] & re.IGNORECASE):
        return _anchors(av[-1])
    return None


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    try:
        parsed = sre_parse.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise RuleFileError(f"{where}: bad regex: {exc}") from None
    items = list(parsed)
    if items and items[0][0] in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT) and items[0][1][0] == 0:
        raise RuleFileError(f"{where}: the regex starts with an optional repeat (it would be tried at every offset)")
    if (why := _repeat_problem(items)) is not None:
        raise RuleFileError(f"{where}: the regex could take super-linear time: {why}")
    return compiled


def _field(raw: dict, key: str, kind: type, where: str, default=None):
    value = raw.get(key, default)
    if value is None or isinstance(value, kind):
        return value
    raise RuleFileError(f"{where}: `{key}` must be a {kind.__name__}, got {type(value).__name__}")


def _rule(raw: dict, language: str, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise RuleFileError(f"{where}: each [[rule]] must be a table")
    unknown = set(raw) - _COMMON_KEYS - _REGEX_KEYS - _CALL_KEYS
    if unknown:
        raise RuleFileError(f"{where}: unknown key(s) {sorted(unknown)}")
    rid = _field(raw, "id", str, where)
    if not rid:
        raise RuleFileError(f"{where}: `id` is missing")
    where = f"{where} ({rid})"
    cwe, severity = _field(raw, "cwe", str, where, ""), _field(raw, "severity", str, where, "")
    if not re.fullmatch(r"CWE-\d{1,5}", cwe):
        raise RuleFileError(f"{where}: `cwe` must look like CWE-79, got {cwe!r}")
    if severity not in SEVERITIES:
        raise RuleFileError(f"{where}: `severity` must be one of {SEVERITIES}, got {severity!r}")
    message = _field(raw, "message", str, where, "") or rid
    when = _field(raw, "when", str, where, "nonliteral")
    if when not in WHEN:
        raise RuleFileError(f"{where}: `when` must be one of {WHEN}, got {when!r}")
    common = dict(id=rid, cwe=cwe, severity=severity, message=message, language=language, when=when)
    if ("regex" in raw) == ("call" in raw):
        raise RuleFileError(f"{where}: a rule has exactly one of `regex` or `call`")
    if "regex" in raw:
        return _regex_rule(raw, common, where)
    return _call_rule(raw, common, where, language)


def _regex_rule(raw: dict, common: dict, where: str) -> Rule:
    regex = compile_pattern(_field(raw, "regex", str, where), where)
    view = _field(raw, "view", str, where, "code")
    if view not in VIEWS:
        raise RuleFileError(f"{where}: `view` must be one of {VIEWS}, got {view!r}")
    unless = raw.get("unless")
    arg = _field(raw, "arg", str, where, "a" if "a" in regex.groupindex else None)
    if arg is not None and arg not in regex.groupindex:
        raise RuleFileError(f"{where}: `arg` names group {arg!r}, which the regex does not have")
    parsed = sre_parse.parse(regex.pattern)
    needs = _field(raw, "needs", list, where)
    if needs is not None and not (needs and all(isinstance(n, str) and n for n in needs)):
        raise RuleFileError(f"{where}: `needs` must be a non-empty list of strings")
    anchors = tuple(needs) if needs else None if parsed.state.flags & re.IGNORECASE else _anchors(parsed)
    return Rule(**common, regex=regex, view=view, arg=arg, anchors=anchors,
                unless=compile_pattern(_field(raw, "unless", str, where), where) if unless is not None else None)


def _call_rule(raw: dict, common: dict, where: str, language: str) -> Rule:
    if language != "python":
        raise RuleFileError(f"{where}: `call` rules are Python syntax-tree rules; use `regex` for {language}")
    call = raw["call"]
    if not (isinstance(call, list) and call and all(isinstance(c, str) for c in call)):
        raise RuleFileError(f"{where}: `call` must be a non-empty list of dotted names")
    receiver = _field(raw, "receiver", str, where)
    keywords = _field(raw, "keywords", dict, where, {})
    for key, value in keywords.items():
        if isinstance(value, str):
            compile_pattern(value, f"{where} keywords.{key}")
    absent = _field(raw, "absent", list, where, [])
    callee = re.compile("|".join(fnmatch.translate(c) for c in call))
    return Rule(**common, call=tuple(call), callee=callee, arg_index=_field(raw, "arg_index", int, where),
                arg_keyword=_field(raw, "arg_keyword", str, where), keywords=dict(keywords), absent=tuple(absent),
                receiver=compile_pattern(receiver, f"{where} receiver") if receiver else None)


def load_file(path: Path) -> list[Rule]:
    """One rule file; the language is the file's stem (python.toml -> python)."""
    language = path.stem
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RuleFileError(f"{path.name}: not valid TOML: {exc}") from None
    rules = data.get("rule", [])
    if set(data) - {"rule"} or not isinstance(rules, list):
        raise RuleFileError(f"{path.name}: a rule file holds only [[rule]] tables")
    return [_rule(raw, language, f"{path.name} rule {i + 1}") for i, raw in enumerate(rules)]


def load_rules(directory: Path = RULES_DIR) -> dict[str, list[Rule]]:
    """language -> its rules (inherited ones included), from every *.toml in `directory`."""
    own: dict[str, list[Rule]] = {}
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.toml")):
        for rule in load_file(path):
            if rule.id in seen:
                raise RuleFileError(f"{path.name}: rule id {rule.id!r} is also in {seen[rule.id]}")
            seen[rule.id] = path.name
            own.setdefault(rule.language, []).append(rule)
    return {lang: own.get(lang, []) + [r for base in INHERITS.get(lang, ()) for r in own.get(base, [])]
            for lang in (set(own) | set(INHERITS)) - {"common"}}


@lru_cache(maxsize=1)
def default_rules() -> dict[str, list[Rule]]:
    return load_rules(RULES_DIR)
