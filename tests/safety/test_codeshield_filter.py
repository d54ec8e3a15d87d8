"""Code Shield's stream filter on its own: any split of a reply into pieces gives the same text out;
block mode withholds an insecure block (the code never leaves), warn mode streams it and appends a
warning; prose, unknown-language blocks and clean code pass unchanged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.server.codeshield import CodeShieldFilter

INSECURE = "Here you go:\n\n```python\nimport os\nos.system('ping ' + host)\n```\n\nDone.\n"
CLEAN = "Sure:\n\n```python\nprint('hello')\n```\nBye.\n"
WARNING_ONLY = "```c\nint r = rand();\n```\n"


def run(mode: str, pieces: list[str]) -> tuple[str, dict, list[str]]:
    out = CodeShieldFilter(mode).output()
    shown = [out.push(p) for p in pieces]
    shown.append(out.finish())
    return "".join(shown), out.report()["code_shield"], shown


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def test_block_mode_withholds_insecure_block():
    text, report, _ = run("block", [INSECURE])
    assert "os.system('ping" not in text and "Code Shield withheld a code block" in text
    assert text.startswith("Here you go:\n\n") and text.endswith("\nDone.\n")
    assert report["blocked"] == 1 and report["findings"][0]["rule"] == "python-os-command"
    assert report["findings"][0]["line"] == 5  # the line in the whole reply


def test_block_mode_never_streams_code_before_the_verdict():
    _, _, shown = run("block", list(INSECURE))  # one character at a time
    assert "".join(shown).count("import os") == 0 and not any("system(" in piece for piece in shown)


def test_warn_mode_streams_code_and_appends_warning():
    text, report, shown = run("warn", list(INSECURE))
    assert "os.system('ping ' + host)" in text and "Code Shield warning" in text
    assert report["blocked"] == 0 and len(report["findings"]) == 1
    first_code = next(i for i, p in enumerate(shown) if p == "o" and "".join(shown[:i]).endswith("import "))
    assert first_code < len(shown) - 20, "warn mode passes code on as it streams"


def test_clean_and_warning_only_blocks_released():
    text, report, _ = run("block", [CLEAN])
    assert text == CLEAN and report == {"mode": "block", "blocked": 0, "findings": []}
    text, report, _ = run("block", [WARNING_ONLY])
    assert text.startswith(WARNING_ONLY) and "Code Shield warning" in text and report["blocked"] == 0


def test_unclosed_block_scanned_at_the_end():
    text, report, _ = run("block", ["```c\nchar b[4];\ngets(b);"])
    assert "gets(b)" not in text and "char b[4]" not in text and report["blocked"] == 1


def test_prose_and_unknown_language_pass_through():
    reply = "Use `os.system` with care.\n```bash\nrm -rf \"$dir\"\n```\n"
    assert run("block", [reply])[0] == reply


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       reply=st.sampled_from([INSECURE, CLEAN, WARNING_ONLY, INSECURE + CLEAN, "no code at all\n``"]),
       mode=st.sampled_from(["block", "warn"]))
def test_any_split_gives_the_same_output(cuts, reply, mode):
    whole, report, _ = run(mode, [reply])
    pieces, report2, _ = run(mode, split(reply, cuts))
    assert pieces == whole and report2 == report
