"""The SemDeDup figures of docs/curation.md: MiniLM cosine of every labelled near-duplicate pair of
data/web/messy_mix.jsonl (with its shingle Jaccard) and of every pair of distinct English originals.

    python scripts/curation_semdedup_figures.py
"""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from corral.embed.minilm import SentenceEncoder  # noqa: E402


def main() -> None:
    rows = [json.loads(line) for line in open(ROOT / "data/web/messy_mix.jsonl")]
    by_id = {r["id"]: i for i, r in enumerate(rows)}
    emb = SentenceEncoder.load().encode([r["text"] for r in rows]).numpy()  # (215, 384), unit rows
    print("near-duplicate pairs: shingle-5 Jaccard, cosine")
    for i, r in enumerate(rows):
        original = r["labels"]["near_dup_of"]
        if original:
            print(r["labels"]["shingle5_jaccard_to_orig"], round(float(emb[i] @ emb[by_id[original]]), 4))
    originals = [i for i, r in enumerate(rows) if r["labels"]["lang"] == "en" and not any(
        r["labels"][k] for k in ("exact_dup_of", "near_dup_of", "synthetic"))]
    sims = (emb[originals] @ emb[originals].T)[np.triu_indices(len(originals), 1)]
    print(f"{len(sims)} pairs of distinct originals: max cosine {sims.max():.4f}; "
          + ", ".join(f">= {t}: {(sims >= t).sum()}" for t in (0.8, 0.85, 0.9)))


if __name__ == "__main__":
    main()
