"""Code Shield's rule files: every shipped file loads, and a bad file is refused at load, by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corral.errors import RuleFileError
from corral.safety.code_rules import RULES_DIR, load_rules
from corral.safety.code_text import LANGUAGES

GOOD = '''
[[rule]]
id = "x-good"
cwe = "CWE-78"
severity = "error"
message = "m"
regex = \'\'\'\\bsystem\\s*\\(\'\'\'
'''


def _write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def test_shipped_rules_cover_every_language():
    rules = load_rules(RULES_DIR)
    for language in LANGUAGES:
        own = [r for r in rules[language] if r.language == language]
        assert len(own) >= 4, f"{language} has only {len(own)} rules of its own"
        assert all(re.fullmatch(r"CWE-\d+", r.cwe) and r.severity in ("error", "warning") for r in rules[language])
    assert any(r.call for r in rules["python"]), "Python has syntax-tree rules"
    assert {r.id for r in rules["c"]} <= {r.id for r in rules["cpp"]}, "C++ runs the C rules"


@pytest.mark.parametrize("pattern, why", [
    (r"eval\(.*\)", "super-linear"),          # unbounded .* is refused: write {0,N}
    (r"(a{1,5}){1,9}", "super-linear"),       # a repeat inside a repeat
    (r"\w+\(", "super-linear"),
    (r"\s*eval", "starts with an optional repeat"),
    (r"eval(", "bad regex"),
    (r"ab{0,5000}", "super-linear"),
])
def test_bad_pattern_refused_with_file_and_rule(tmp_path, pattern, why):
    text = GOOD.replace(r"\bsystem\s*\(", pattern).replace("x-good", "x-bad")
    with pytest.raises(RuleFileError) as info:
        load_rules(_write(tmp_path, "c.toml", text))
    assert "c.toml" in str(info.value) and "x-bad" in str(info.value) and why in str(info.value)


@pytest.mark.parametrize("mutation, why", [
    (lambda t: t.replace('cwe = "CWE-78"', 'cwe = "78"'), "cwe"),
    (lambda t: t.replace('severity = "error"', 'severity = "fatal"'), "severity"),
    (lambda t: t + 'colour = "red"\n', "unknown key"),
    (lambda t: t.replace("[[rule]]", "[[rule"), "not valid TOML"),
    (lambda t: t + t, "also in"),
    (lambda t: t.replace("regex =", "call = [\"os.system\"]\nregexx ="), "unknown key"),
    (lambda t: t.replace("[[rule]]", "[[rule]]\narg = \"nope\""), "group"),
])
def test_malformed_rule_file_refused(tmp_path, mutation, why):
    with pytest.raises(RuleFileError) as info:
        load_rules(_write(tmp_path, "c.toml", mutation(GOOD)))
    assert "c.toml" in str(info.value) and why in str(info.value)


def test_call_rules_only_in_python(tmp_path):
    text = GOOD.replace("regex = '''\\bsystem\\s*\\('''", 'call = ["system"]')
    with pytest.raises(RuleFileError, match="syntax-tree"):
        load_rules(_write(tmp_path, "c.toml", text))
    py = tmp_path / "py"
    py.mkdir()
    assert [r.call for r in load_rules(_write(py, "python.toml", text))["python"]] == [("system",)]


def test_good_file_loads(tmp_path):
    rules = load_rules(_write(tmp_path, "c.toml", GOOD))
    assert [r.id for r in rules["c"]] == ["x-good"] and rules["c"][0].cwe == "CWE-78"
