"""Code Shield in process: scan code, or the code blocks of a model's reply, for insecure patterns.

    scan(code, "python")  -> ScanResult(findings=[Finding(line, rule, cwe, severity, message)], ...)
    scan_reply(markdown)  -> the findings of every fenced block (tag -> language, or a guess)

Rules are data (code_rules.py, rules/*.toml): regexes over masked views of the code (code_text.py)
for every language, and syntax-tree rules for Python (code_python.py). Time is bounded whatever the
input: at most MAX_CHARS are scanned (the rest is reported as `truncated`), lines are cut at
MAX_LINE characters (minified code), text with NUL or many control bytes is not code (`skipped`),
and every regex was checked at load to run in linear time.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from corral.errors import CodeScanError
from corral.safety.code_python import tree_findings
from corral.safety.code_rules import Rule, default_rules
from corral.safety.code_text import LANGUAGE_NAMES, LANGUAGES, Views, fenced_blocks, guess_language, views

MAX_CHARS = 1 << 20
MAX_LINE = 2000
ASSIGNMENT_LOOKBACK = 4000  # characters before a match searched for the assignments of its argument
MAX_PER_RULE = 200  # matches of one rule reported per snippet: enough to act on, bounded in a pasted dump
_LONG_LINE = re.compile(rf"[^\n]{{{MAX_LINE + 1},}}")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_IDENT = re.compile(r"[A-Za-z_$@]")
_CONST = re.compile(r"(?:[A-Z][A-Z0-9_]{1,63}|-?\d[\w.]{0,40}|true|false|null|NULL|nullptr|None)")
_ARRAY_OF = re.compile(r"\bnew\s+\w{1,64}\s*\[\s*\]|\bString\.join\b")  # `new String[] {"ls", "-l"}`
_STRING_LITERAL = re.compile(r"""[@rbfuRBFU]{0,2}(?:"[^"\n]{0,4000}"|'[^'\n]{0,4000}'|`[^`$]{0,4000}`)""")


@dataclass(frozen=True)
class Finding:
    line: int
    rule: str
    cwe: str
    severity: str
    message: str
    language: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScanResult:
    language: str | None
    findings: list[Finding] = field(default_factory=list)
    truncated: bool = False
    """Only the first MAX_CHARS characters were scanned."""
    skipped: str | None = None
    """Why nothing was scanned (binary input), else None."""

    @property
    def insecure(self) -> bool:
        return bool(self.findings)

    @property
    def blocking(self) -> bool:
        return any(f.severity == "error" for f in self.findings)


def normalize_language(name: str) -> str:
    language = LANGUAGE_NAMES.get(name.lower().lstrip("."))
    if language is None:
        raise CodeScanError(f"language {name!r} is not one Code Shield knows; use one of {', '.join(LANGUAGES)}")
    return language


def is_binary(code: str) -> bool:
    head = code[:8192]
    return "\x00" in head or len(_CONTROL.findall(head)) > len(head) // 10


def _bounded(code: str) -> tuple[str, bool]:
    truncated = len(code) > MAX_CHARS
    code = code[:MAX_CHARS]
    if _LONG_LINE.search(code):  # keep the line count (so line numbers hold), cut each line's length
        code = _LONG_LINE.sub(lambda m: m.group()[:MAX_LINE], code)
    return code, truncated


def literal_text(arg: str, view: Views, start: int) -> bool:
    """Is a regex rule's captured argument (in the code view) known from the snippet alone? String
    literals (joined only with each other; a template's ${...} or PHP's "$var" stays visible in the
    code view, so those are not literal), a number or an ALL_CAPS constant, or a name every assignment
    before it in the snippet gives a string literal (`char *cmd = "ls"; system(cmd)`)."""
    stripped = arg.strip()
    if not stripped:
        return False
    rest = _ARRAY_OF.sub("", _STRING_LITERAL.sub("", stripped))
    if len(rest) < len(stripped) and not _IDENT.search(rest):
        return True
    if _CONST.fullmatch(stripped):
        return True
    if re.fullmatch(r"\$?[A-Za-z_]\w{0,63}", stripped):
        before = view.code[max(0, start - ASSIGNMENT_LOOKBACK):start]
        assigned = re.findall(r"(?<![\w$])" + re.escape(stripped) + r"\s*=(?!=)\s*(\S)", before)
        return bool(assigned) and all(c in "\"'`" for c in assigned)
    return False


def _regex_findings(view: Views, rules: Iterable[Rule]) -> Iterable[tuple[Rule, int]]:
    for rule in rules:
        if rule.regex is None:
            continue
        text = view.code if rule.view == "code" else view.text
        if rule.anchors is not None and not any(a in text for a in rule.anchors):
            continue
        matches = itertools.islice(rule.regex.finditer(text), MAX_PER_RULE)
        offsets = [m.start() for m in matches if _arg_ok(rule, m, view)]
        # `unless` is looked for only once the rule has matched: most rules match nothing in most code
        if offsets and not (rule.unless is not None and rule.unless.search(text)):
            yield from ((rule, offset) for offset in offsets)


def _arg_ok(rule: Rule, m: re.Match, view: Views) -> bool:
    if rule.arg is None or m.group(rule.arg) is None or rule.when == "any":
        return True
    return literal_text(view.code[m.start(rule.arg):m.end(rule.arg)], view, m.start()) == (rule.when == "literal")


def scan(code: str, language: str | None, rules: dict[str, list[Rule]] | None = None) -> ScanResult:
    """Findings in one snippet, sorted by line; language None: guessed, and every language's rules
    when no guess is possible."""
    if is_binary(code):
        return ScanResult(language, skipped="binary: NUL or control bytes, not code")
    rules = default_rules() if rules is None else rules
    code, truncated = _bounded(code)
    language = normalize_language(language) if language else guess_language(code)
    found: dict[tuple[str, int], Finding] = {}
    line_ends: list[int] = []  # offset of each line's end, built on the first finding only
    for lang in [language] if language else list(LANGUAGES):
        view = views(code, lang)
        for rule, offset in _regex_findings(view, rules.get(lang, [])):
            line_ends = line_ends or list(itertools.accumulate(len(s) + 1 for s in code.split("\n")))
            line = bisect.bisect_right(line_ends, offset) + 1
            found.setdefault((rule.id, line), Finding(line, rule.id, rule.cwe, rule.severity, rule.message, lang))
        if lang == "python":
            for rule, line in tree_findings(code, rules.get(lang, [])):
                found.setdefault((rule.id, line), Finding(line, rule.id, rule.cwe, rule.severity, rule.message, lang))
    return ScanResult(language, sorted(found.values(), key=lambda f: (f.line, f.rule)), truncated)


@dataclass
class BlockScan:
    """One fenced block of a reply and what the scan found in it (lines relative to the reply)."""

    language: str | None
    start: int
    end: int
    result: ScanResult


def scan_reply(reply: str, rules: dict[str, list[Rule]] | None = None) -> list[BlockScan]:
    """Every fenced code block of a model's reply, scanned; a block whose tag names a language Code
    Shield does not know (```bash) is left alone."""
    out = []
    for block in fenced_blocks(reply):
        if block.language is None:
            continue
        result = scan(block.code, block.language, rules)
        result.findings = [Finding(f.line + block.line - 1, f.rule, f.cwe, f.severity, f.message, f.language)
                           for f in result.findings]
        out.append(BlockScan(block.language, block.line, block.line + block.code.count("\n"), result))
    return out
