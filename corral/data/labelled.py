"""Scoring a curation run against a labelled set (data/web/messy_mix.jsonl: labels per document).

Each label is a class of documents the pipeline should drop, and a family of steps that should drop
it: recall is the share of the class dropped by that family, precision the share of the family's drops
that belong to the class. Duplicates are judged as pairs: a duplicate pair is found when either member
is dropped as the duplicate of the other (or of a document with the same original), and a dedup drop is
wrong when its kept twin is unrelated.
"""

from __future__ import annotations

import json
from pathlib import Path

DEDUP_STEPS = ("exact_dedup", "minhash_dedup", "semantic_dedup")


def _load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def root_of(labels: dict[str, dict]) -> dict[str, str]:
    """Every document's original: follow exact_dup_of / near_dup_of until a document with neither."""
    roots = {}
    for doc_id in labels:
        seen, node = set(), doc_id
        while node in labels and node not in seen:
            seen.add(node)
            parent = labels[node].get("exact_dup_of") or labels[node].get("near_dup_of")
            if not parent:
                break
            node = parent
        roots[doc_id] = node
    return roots


def _family(step: str) -> str:
    kind = step.split("_", 1)[1] if step[:2].isdigit() else step
    return "dedup" if kind in DEDUP_STEPS else "language" if kind == "language" else "heuristic"


def score(labelled_path: str | Path, exclusions: list[dict], near_dup_min_jaccard: float = 0.8) -> dict:
    """Per-label counts, recall and precision for a run's exclusion records on the labelled set."""
    docs = {d["id"]: d for d in _load(Path(labelled_path))}
    labels = {i: d["labels"] for i, d in docs.items()}
    roots = root_of(labels)
    dropped = {e["id"]: e for e in exclusions}
    fam = {i: _family(e["step"]) for i, e in dropped.items()}
    exact_found, exact_total = _pairs(labels, dropped, roots, "exact_dup_of", lambda lab: True)
    near_found, near_total = _pairs(labels, dropped, roots, "near_dup_of",
                                    lambda lab: (lab["shingle5_jaccard_to_orig"] or 0) >= near_dup_min_jaccard)
    wrong_dups = [i for i, e in dropped.items() if fam[i] == "dedup"
                  and roots.get(i) != roots.get(e["metadata"].get("duplicate_of"))]
    originals = [i for i, lab in labels.items() if not lab["exact_dup_of"] and not lab["near_dup_of"]
                 and lab["lang"] == "en" and not lab["synthetic"]]
    non_en = [i for i, lab in labels.items() if lab["lang"] != "en"]
    english = [i for i, lab in labels.items() if lab["lang"] == "en"]
    junk = [i for i, lab in labels.items() if lab["synthetic"] and lab["synthetic"] != "near_duplicate"]
    return {
        "exact_duplicates": {"found": exact_found, "total": exact_total},
        "near_duplicates": {"min_jaccard": near_dup_min_jaccard, "found": near_found, "total": near_total},
        "dedup_drops_of_unrelated": len(wrong_dups),
        "originals_dropped_as_unrelated_dup": sum(i in wrong_dups for i in originals),
        "non_english": _pr(non_en, [i for i in dropped if fam[i] == "language"]),
        "english_lost_to_language": sum(fam.get(i) == "language" for i in english),
        "junk": _pr(junk, [i for i in dropped if fam[i] == "heuristic"]),
        "dedup": _pr([i for i, lab in labels.items() if lab["exact_dup_of"] or lab["near_dup_of"]],
                     [i for i in dropped if fam[i] == "dedup"]),
        "expected_keep_lost": sum(labels[i]["expected_keep"] is True and i in dropped for i in labels),
    }


def _pairs(labels, dropped, roots, key, wanted) -> tuple[int, int]:
    """(labelled pairs with one member dropped as a duplicate of the same original, pairs)."""
    found = total = 0
    for doc_id, lab in labels.items():
        if not lab[key] or not wanted(lab):
            continue
        total += 1
        for member in (doc_id, lab[key]):
            rec = dropped.get(member)
            twin = rec["metadata"].get("duplicate_of") if rec else None
            if rec and _family(rec["step"]) == "dedup" and roots.get(twin) == roots[doc_id]:
                found += 1
                break
    return found, total


def _pr(relevant: list[str], dropped: list[str]) -> dict:
    """Recall of the class by a step family and precision of that family's drops."""
    hit = len(set(relevant) & set(dropped))
    return {"total": len(relevant), "dropped": hit, "recall": round(hit / max(len(relevant), 1), 4),
            "family_drops": len(dropped), "precision": round(hit / max(len(dropped), 1), 4)}
