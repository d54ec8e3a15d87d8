"""Filters on small hand-made documents: each rule fires with its reason, and clean text passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corral.data.blocklists import BadWords, BadWordsConfig, PiiMask, UrlFilter
from corral.data.dedup import LineDedup, MinHashConfig, MinHasher, candidate_probability, exact_signature
from corral.data.documents import Document, ExclusionWriter
from corral.data.quality import C4, FineWeb, GopherQuality, GopherRepetition

ROOT = Path(__file__).parents[2]
CLEAN = ("The river runs through the old town, and the people who live there have built bridges over it. "
         "Each bridge has a name and a story that the children learn at school.\n") * 1
CLEAN += ("Fishing boats leave the harbour at dawn and return with the catch before noon. The market opens "
          "when they arrive, and the whole town comes to buy what the sea has given.\n"
          "In winter the river freezes, which is when the festival of lights is held on the ice.")


def doc(text: str, **metadata) -> Document:
    return Document(text, "x", dict(metadata))


def test_clean_text_passes_every_heuristic():
    for step in (GopherQuality(), GopherRepetition(), C4(), FineWeb()):
        assert step.keep(doc(CLEAN)) == (True, ""), step.name


def test_gopher_quality_rules_name_their_reason():
    g = GopherQuality()
    assert g.keep(doc("Too short to count."))[1] == "gopher_short"
    assert g.keep(doc(" ".join(["#tag"] * 60)))[1] == "gopher_symbol_ratio"
    assert g.keep(doc(" ".join(["banana", "apple", "cherry"] * 30)))[1] == "gopher_stop_words"


def test_gopher_repetition_catches_repeated_lines_and_ngrams():
    r = GopherRepetition()
    assert r.keep(doc("\n".join(["Buy cheap loans online today now."] * 10 + [CLEAN])))[1] == "dup_line_frac"
    assert r.keep(doc("cheap loans online " * 40))[1].startswith(("top_", "dup_"))


def test_c4_removes_bad_lines_and_drops_code_pages():
    c4 = C4()
    page = doc(CLEAN + "\nPlease enable Javascript to view this site.\nMenu")
    assert c4.keep(page) == (True, "") and "Javascript" not in page.text and "Menu" not in page.text
    assert c4.keep(doc(CLEAN + "\nfunction f() { return 1; }"))[1] == "c4_curly_bracket"
    assert c4.keep(doc("One sentence only here with words."))[1] == "c4_too_few_sentences"


def test_fineweb_drops_list_like_pages():
    assert FineWeb().keep(doc("\n".join(f"item {i}" for i in range(40))))[1] == "fineweb_line_punct"


def test_url_and_bad_word_lists_come_from_the_package():
    assert UrlFilter().keep(doc(CLEAN, url="https://www.pornhub.com/x"))[1].startswith("url_")
    assert UrlFilter().keep(doc(CLEAN, url="https://en.wikipedia.org/wiki/River")) == (True, "")
    words = BadWords(BadWordsConfig(max_score=0.05))
    page = doc(CLEAN + " porn")
    assert words.keep(page) == (True, "") and 0 < page.metadata["nsfw_score"] <= 0.05
    assert BadWords().keep(doc(CLEAN + " porn"))[1] == "nsfw_words"


def test_pii_is_masked_and_counted():
    step = PiiMask()
    (out,) = step.run([doc("Write to ann.lee@example.org, call +1 415-555-0134, host 10.0.0.12; in 2020-2021.")])
    assert out.text == "Write to <EMAIL>, call <PHONE>, host <IP>; in 2020-2021."
    assert step.stats.changed == {"masked_email": 1, "masked_phone": 1, "masked_ip": 1}


def test_line_dedup_removes_lines_shared_by_many_documents_of_a_shard():
    footer = "Copyright 2024 Example Corp. All rights reserved."
    docs = [doc(f"Article number {i} has its own words.\n{footer}") for i in range(4)] + [doc(footer)]
    step = LineDedup()
    kept = list(step.run(docs))
    assert len(kept) == 4 and all(footer not in d.text for d in kept)
    assert step.stats.dropped == {"all_lines_repeated": 1}


def test_exclusion_writer_keeps_dropped_documents_with_reason(tmp_path):
    with ExclusionWriter(tmp_path / "x.jsonl") as writer:
        step = GopherQuality()
        step.exclude = writer
        assert list(step.run([doc("short"), doc(CLEAN)])) != []
    assert '"reason": "gopher_short"' in (tmp_path / "x.jsonl").read_text()
    assert step.stats.seen == 2 and step.stats.kept == 1


def test_minhash_estimates_jaccard_and_exact_hash_ignores_case_and_punctuation():
    m = MinHasher(MinHashConfig())
    a, b = m.signature(CLEAN), m.signature(CLEAN.replace("harbour", "harbor"))
    assert 0.7 < (a == b).mean() < 1.0
    assert (m.signature(CLEAN) == a).all()  # deterministic across calls (and processes: crc32, fixed seed)
    assert exact_signature("Hello, World!") == exact_signature("hello world")
    assert candidate_probability(0.8, 20, 5) > 0.99 and candidate_probability(0.3, 20, 5) < 0.06


def test_language_id_works_with_the_network_disabled():
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
            "socket.socket.connect = refuse; socket.create_connection = refuse\n"
            "from corral.data.language import detect_language\n"
            "print(detect_language('The quick brown fox jumps over the lazy dog near the river bank.')[0],"
            " detect_language('Der schnelle braune Fuchs springt über den faulen Hund am Flussufer.')[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["en", "de"]
