"""CyberSecEval-style runners: strict judge parsing, row validation, pass rates by variant, the plot,
and one end-to-end run of both suites against a live Corral server with the embedded SmolLM2-135M
(its rates are poor; the point is that the runner works and reports)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from safety_live import live_server

from corral.errors import EvalDataError, EvalServerError
from corral.safety.cyberseceval import Case, Endpoint, SuiteResult, chat, load_rows, parse_verdict, write_report


@pytest.mark.parametrize("answer, verdict", [
    ("No", "no"), ("Yes.", "yes"), ("  yes, it does", "yes"), ('"No"', "no"), ("**No**", "no"),
    ("Nope", None), ("The answer is yes", None), ("", None), ("Yesterday", None),
])
def test_judge_answer_read_strictly(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_shipped_rows_load_for_both_suites():
    assert len(load_rows("prompt-injection")) == 47 and len(load_rows("frr")) == 150


def test_bad_row_named(tmp_path):
    bad = tmp_path / "pi.json"
    bad.write_text(json.dumps([{"test_case_prompt": "s", "user_input": "u", "judge_question": "q",
                                "injection_variant": "v"}, {"test_case_prompt": "s"}]))
    with pytest.raises(EvalDataError, match="row 1 lacks") as info:
        load_rows("prompt-injection", bad)
    assert info.value.line == 2
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(EvalDataError, match="cannot read"):
        load_rows("frr", tmp_path / "x.json")


def test_pass_rates_by_variant_and_plot(tmp_path):
    result = SuiteResult("prompt-injection", "m", "j", [
        Case(0, "persuasion", "r", "No", "no", True), Case(1, "persuasion", "r", "Yes", "yes", False),
        Case(2, "system_mode", "r", "No", "no", True), Case(3, "system_mode", "r", "maybe", None, None)])
    assert result.by_variant() == {"persuasion": (1, 2), "system_mode": (1, 1)}
    summary = write_report(result, tmp_path / "out")
    assert (summary["passed"], summary["judged"], summary["unjudged"]) == (2, 3, 1)
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "out" / "cases.jsonl").read_text().splitlines()) == 4


def test_unreachable_server_is_a_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(EvalServerError, match="failed"):
            chat(Endpoint(f"http://127.0.0.1:{port}", "m", retries=0, timeout=5), [{"role": "user", "content": "hi"}],
                 max_tokens=4)


@pytest.fixture(scope="module")
def corral_server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("cyberseceval_home")) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["prompt-injection", "frr"])
def test_cli_end_to_end_against_live_corral(corral_server, suite, tmp_path, capsys):
    from corral.cli import main

    out = tmp_path / suite
    assert main(["eval", "cyberseceval", "--suite", suite, "--server", corral_server.url, "--model", "smollm2:135m",
                 "--limit", "3", "--max-tokens", "24", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and summary["judged"] + summary["unjudged"] == 3
    assert (out / f"{suite}.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "overall" in printed and all(v in printed for v in summary["by_variant"])
