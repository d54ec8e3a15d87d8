"""HumanEval pass@k and GSM8K answer extraction, on the dev data shipped in data/eval."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from corral.eval import gsm8k, humaneval

DATA = Path(os.environ.get("CORRAL_EVAL_DATA") or Path(__file__).resolve().parents[2] / "data" / "eval")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("n,c,k", [(1, 1, 1), (1, 0, 1), (5, 2, 1), (10, 3, 5), (20, 1, 10), (200, 13, 100),
                                   (7, 0, 3), (7, 7, 3), (4, 1, 4)])
def test_pass_at_k_equals_the_binomial_formula(n, c, k):
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_1_is_the_share_of_passing_samples():
    assert humaneval.pass_at_k(5, 2, 1) == pytest.approx(0.4)


def test_pass_at_k_refuses_more_passes_than_samples():
    with pytest.raises(ValueError, match="c <= n"):
        humaneval.pass_at_k(3, 4, 1)


@pytest.mark.slow
def test_canonical_solutions_score_one_and_empty_bodies_zero():
    rows = _rows(DATA / "humaneval" / "humaneval_dev.jsonl")
    assert len(rows) == 33
    canonical = humaneval.run_samples(rows, [[r["canonical_solution"]] for r in rows])
    failing = [(s.task_id, s.error) for r in canonical for s in r if not s.passed]
    assert not failing
    assert humaneval.score(canonical) == {"pass@1": 1.0}
    empty = humaneval.run_samples(rows, [["    pass\n"] for _ in rows])
    assert humaneval.score(empty) == {"pass@1": 0.0}


def test_pass_at_k_mixes_passing_and_failing_samples():
    rows = _rows(DATA / "humaneval" / "humaneval_dev.jsonl")[:2]
    samples = [[rows[0]["canonical_solution"], "    return None\n", "    while True: pass\n"],
               [rows[1]["canonical_solution"]] * 3]
    results = humaneval.run_samples(rows, samples)
    assert [[s.passed for s in r] for r in results] == [[True, False, False], [True, True, True]]
    assert results[0][2].status == "timeout"
    scores = humaneval.score(results, ks=(1, 2, 5))
    assert scores["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert scores["pass@2"] == pytest.approx((1 - 1 / 3 + 1) / 2)  # 1 - C(2,2)/C(3,2)
    assert "pass@5" not in scores  # more than the 3 samples each task has


def test_truncate_cuts_at_the_next_top_level_statement():
    text = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert humaneval.truncate(text) == "    return x + 1\n\n"
    assert humaneval.truncate("    # a comment inside\n    return 1\n") == "    # a comment inside\n    return 1\n"


@pytest.mark.parametrize("output,strict,flexible", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12", "12"),
    ("So the total is $1,234.\n#### 1,234", "1234", "1234"),
    ("The answer is 42.", None, "42"),
    ("#### -7\nQuestion: next one has 3 apples", "-7", "3"),
    ("no number here", None, None),
])
def test_gsm8k_extraction_strict_and_flexible(output, strict, flexible):
    assert gsm8k.extract_strict(output) == strict
    assert gsm8k.extract_flexible(output) == flexible


def test_gsm8k_reference_answers_are_their_final_numbers():
    rows = _rows(DATA / "gsm8k" / "gsm8k_test_dev.jsonl")
    assert gsm8k.reference(rows[0]["answer"]) == rows[0]["answer"].split("####")[-1].strip().replace(",", "")
    # The reference solutions themselves score 1.0 under both extractions.
    scores = gsm8k.exact_match([r["answer"] for r in rows], [r["answer"] for r in rows])
    assert scores == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}


def test_gsm8k_wrong_numbers_score_zero():
    assert gsm8k.exact_match(["#### 5", "it is 6"], ["x\n#### 4", "y\n#### 7"]) == {
        "exact_match_strict": 0.0, "exact_match_flexible": 0.0}


def test_run_generation_scores_given_completions_per_task():
    from corral.eval.gentasks import run_generation

    rows = _rows(DATA / "humaneval" / "humaneval_dev.jsonl")[:3]
    by_prompt = {r["prompt"]: r["canonical_solution"] for r in rows}
    seen = []

    def generate(requests):
        seen.extend(requests)
        # a canonical body, then what a model often adds after it: the stop sequences must cut it
        return [[by_prompt[r.prompt] + "\n\ndef extra():\n    raise SystemExit(1)\n"] for r in requests]

    metrics, records = run_generation("humaneval", [r["prompt"] for r in rows], rows, generate)
    assert metrics["pass@1"] == 1.0 and [r["passed"] for r in records] == [[True]] * 3
    assert all(r.until == ("\ndef ", "\nclass ", "\nif ", "\nprint", "\n#") and r.temperature == 0 for r in seen)

    gsm = _rows(DATA / "gsm8k" / "gsm8k_test_dev.jsonl")[:4]
    outputs = [" It is " + gsm8k.reference(r["answer"]) + ".\n#### " + gsm8k.reference(r["answer"]) for r in gsm[:3]]
    metrics, records = run_generation("gsm8k", ["Q"] * 4, gsm, lambda reqs: [[o] for o in outputs + ["#### -1"]])
    assert metrics["exact_match_strict"] == 0.75 and metrics["exact_match_flexible"] == 0.75
    assert records[3]["strict"] == "-1" and metrics["exact_match_strict_stderr"] > 0


def test_chat_answers_code_block_is_taken_as_the_solution():
    row = _rows(DATA / "humaneval" / "humaneval_dev.jsonl")[0]
    whole = "Sure! Here it is:\n```python\n" + row["prompt"] + row["canonical_solution"] + "```\nHope it helps."
    body_only = "```\n" + row["canonical_solution"] + "```"
    wrong = "```python\ndef " + row["entry_point"] + "(*args):\n    return None\n```"
    completions = [humaneval.from_chat(row, a) for a in (whole, body_only, wrong)]
    results = humaneval.run_samples([row], [completions])
    assert [s.passed for s in results[0]] == [True, True, False]
