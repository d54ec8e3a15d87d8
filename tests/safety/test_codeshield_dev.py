"""Code Shield on the dev fixtures (data/code, 95 insecure / 101 secure) against Meta's codeshield 1.0.1.

The golden tests/golden/codeshield_1.0.1_dev.jsonl is codeshield's own output, recorded with
`.venv/peers/codeshield/bin/python scripts/codeshield_peer.py data/code/insecure_code_fixtures_dev.jsonl`
(semgrep 1.100.0, each row scanned with its language): 45 of 95 insecure and 13 of 101 secure flagged
on this machine (the issue quotes 55 and 19). The live test re-runs codeshield on a slice to check
the golden still holds; it skips when the peer venv is not built.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from corral.safety.code_scan import scan

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data" / "code" / "insecure_code_fixtures_dev.jsonl"
GOLDEN = ROOT / "tests" / "golden" / "codeshield_1.0.1_dev.jsonl"
ISSUE_RECALL, ISSUE_FALSE_POSITIVES = 55, 19  # codeshield's figures in issue 17


def _bench():
    spec = importlib.util.spec_from_file_location("bench_codeshield", ROOT / "bench" / "codeshield.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURES.read_text().splitlines() if line.strip()]


def _counts(rows: list[dict], flagged: set[str]) -> tuple[int, int]:
    return (sum(r["id"] in flagged for r in rows if r["label"] == "insecure"),
            sum(r["id"] in flagged for r in rows if r["label"] == "secure"))


def test_dev_recall_and_false_positives_beat_codeshield():
    rows = _rows()
    assert (sum(r["label"] == "insecure" for r in rows), len(rows)) == (95, 196)
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    peer_recall, peer_fp = _counts(rows, {g["id"] for g in golden if g["insecure"]})
    recall, fp = _counts(rows, {r["id"] for r in rows if scan(r["snippet"], r["language"]).insecure})
    assert recall >= max(ISSUE_RECALL, peer_recall), f"recall {recall}/95 vs codeshield {peer_recall}"
    # codeshield flags 13 here with each row's language, 18 without one; the issue's target is its 19
    assert fp <= ISSUE_FALSE_POSITIVES, f"false positives {fp}/101 vs codeshield {peer_fp}"


def test_dev_every_finding_names_rule_cwe_severity_line():
    for row in _rows():
        for f in scan(row["snippet"], row["language"]).findings:
            assert f.rule and f.cwe.startswith("CWE-") and f.severity in ("error", "warning")
            assert 1 <= f.line <= row["snippet"].count("\n") + 1


def test_bench_scores_and_ratios_on_a_slice():
    bench = _bench()
    rows = bench.load_rows(limit=12)
    corral = bench.score(rows, bench.run_corral(rows, repeats=1))
    assert corral["p99_ms"] < 50 and corral["recall"] + corral["false_positives"] >= 1
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()][:12]
    text = bench.table(corral, bench.score(rows, golden), "recorded")
    assert "ratio" in text and "p99_ms" in text


@pytest.mark.slow
def test_live_codeshield_matches_golden_on_a_slice(tmp_path):
    bench = _bench()
    if bench.peer_python() is None:
        pytest.skip("codeshield's venv (.venv/peers/codeshield) is not built")
    rows = _rows()
    # both labels, four languages: the first four rows of each language (~5 s of semgrep)
    languages = ("c", "javascript", "php", "python")
    by_language = {lang: [r for r in rows if r["language"] == lang][:4] for lang in languages}
    picked = [r for group in by_language.values() for r in group]
    sliced = tmp_path / "slice.jsonl"
    sliced.write_text("".join(json.dumps(r) + "\n" for r in picked))
    live = {r["id"]: r["insecure"] for r in bench.run_peer(sliced, timeout=600)}
    golden = {g["id"]: g["insecure"] for g in map(json.loads, GOLDEN.read_text().splitlines()) if g["id"] in live}
    assert len(live) == len(picked) and live == golden
