"""13-gram decontamination against the shipped eval dev sets."""

from __future__ import annotations

import json
from pathlib import Path

from corral.data.decontaminate import Decontaminate, DecontaminateConfig
from corral.data.documents import Document
from corral.data.ngrams import NgramIndex, index_eval_sets, ngrams

ROOT = Path(__file__).parents[2]
EVAL = ROOT / "data/eval"


def test_ngrams_are_normalised_word_windows():
    assert ngrams("The cat, SAT on the mat.", 3) == ["the cat sat", "cat sat on", "sat on the", "on the mat"]
    assert ngrams("too short", 3) == []


def test_index_matches_shared_ngrams_only():
    index = NgramIndex(n=5)
    index.add("one two three four five six seven", "eval")
    assert index.matches("zero one two three four five eight") == {"eval": 1}
    assert not index.matches("one two three four six seven eight")


def test_a_page_quoting_an_eval_question_is_dropped_and_clean_pages_kept():
    row = json.loads((EVAL / "hellaswag/hellaswag_val_dev.jsonl").open().readline())
    quoted = "I found this online today. " + row["ctx"] + " " + row["endings"][row["label"]] + " Amazing, right?"
    clean = " ".join(json.loads(line)["text"] for line in (ROOT / "data/web/c4_demo.jsonl").open().readlines()[:3])
    step = Decontaminate(DecontaminateConfig(eval_paths=[str(EVAL / "hellaswag")]))
    kept = list(step.run([Document(quoted, "q"), Document(clean, "c")]))
    assert [d.id for d in kept] == ["c"]
    assert step.stats.dropped == {"contaminated_hellaswag_val_dev": 1}


def test_report_mode_keeps_the_document_and_names_the_set():
    row = json.loads((EVAL / "arc_easy/arc_easy_dev.jsonl").open().readline())
    text = row["query"] + " " + " ".join(row["choices"])
    step = Decontaminate(DecontaminateConfig(eval_paths=[str(EVAL)], action="report"))
    (doc,) = step.run([Document(text, "a")])
    assert "arc_easy_dev" in doc.metadata["contamination"]


def test_shipped_web_mix_has_no_contamination_with_the_eval_sets():
    index = index_eval_sets([EVAL])
    assert len(index) > 10_000
    rows = [json.loads(line) for line in (ROOT / "data/web/messy_mix.jsonl").open()]
    assert sum(bool(index.matches(r["text"])) for r in rows) == 0
