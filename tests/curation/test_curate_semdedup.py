"""SemDeDup with all-MiniLM-L6-v2: finds the near-duplicates MinHash misses, with no false positives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from corral.cli import minilm_embed
from corral.config import from_dict
from corral.data.executor import curate, run_local
from corral.data.labelled import score
from corral.data.pipeline import CurateConfig
from corral.data.semdedup import SemDedupConfig, semdedup

ROOT = Path(__file__).parents[2]
MIX = ROOT / "data/web/messy_mix.jsonl"
THRESHOLD = 0.85  # docs/curation.md: every labelled near-duplicate pair is >= 0.866, distinct pairs <= 0.55


def test_semdedup_keeps_the_first_of_each_similar_group():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16))
    rows = np.concatenate([base, base[:2] + 0.01 * rng.normal(size=(2, 16))])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert semdedup(rows, SemDedupConfig(threshold=0.95, docs_per_cluster=3)) == [-1] * 6 + [0, 1]


def subset(tmp_path: Path) -> Path:
    """Every near-duplicate, its original, and 40 other English originals (MiniLM on CPU is the cost)."""
    rows = [json.loads(line) for line in MIX.open()]
    pairs = {r["labels"]["near_dup_of"] for r in rows if r["labels"]["near_dup_of"]}
    pick = [r for r in rows if r["labels"]["near_dup_of"] or r["id"] in pairs]
    others = [r for r in rows if r["labels"]["lang"] == "en" and r["id"] not in pairs and not any(
        r["labels"][k] for k in ("near_dup_of", "exact_dup_of", "synthetic"))]
    path = tmp_path / "subset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pick + others[:40]))
    return path


@pytest.mark.slow
def test_semantic_dedup_finds_pairs_minhash_misses_without_false_positives(tmp_path):
    data = subset(tmp_path)
    results = {}
    for kind in ("minhash_dedup", "semantic_dedup"):
        step = {"kind": kind, **({"threshold": THRESHOLD} if kind == "semantic_dedup" else {})}
        config = from_dict(CurateConfig, {"input": {"paths": [str(data)]},
                                          "output": {"dir": str(tmp_path / kind)}, "steps": [step]})
        curate(config, run_local(1), embed=minilm_embed)
        exclusions = [json.loads(line) for line in (tmp_path / kind / "exclusions/shard-00000.jsonl").open()]
        results[kind] = score(data, exclusions, near_dup_min_jaccard=0.0)
    low = score(data, [], near_dup_min_jaccard=0.0)["near_duplicates"]["total"]
    assert low == 20
    assert results["semantic_dedup"]["near_duplicates"]["found"] == 20
    assert results["minhash_dedup"]["near_duplicates"]["found"] < 20  # the low-Jaccard pairs
    assert results["semantic_dedup"]["dedup_drops_of_unrelated"] == 0
