"""Label documents with a Corral-run model's educational score, train the MiniLM ridge classifier on 80%,
report its agreement with the labeller on the held 20%, and save it (docs/curation.md has the figures).

    python scripts/curation_quality_classifier.py --docs 200 --out data/web/quality

The labeller is the embedded SmolLM2-135M-Instruct (or --model NAME) through Corral's engine: the
prompt is corral.data.quality_classifier.EDU_PROMPT in its chat template, and the score is the expected
digit under the model's next-token distribution over "0".."5" (the top-20 log-probs of the first answer
token, renormalised over the digits), which is smoother than the one sampled digit. Writes
labels.jsonl ({"id", "score"}), scorer.npz and agreement.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corral.data.quality_classifier import EDU_PROMPT, agreement, train_scorer  # noqa: E402


def documents(n: int) -> list[dict]:
    """English documents: C4 pages and the labelled mix's real English ones (no duplicates, no junk)."""
    rows = [json.loads(line) for line in (ROOT / "data/web/c4_demo.jsonl").open()]
    rows = [{"id": f"c4-{i}", "text": r["text"]} for i, r in enumerate(rows)]
    for line in (ROOT / "data/web/messy_mix.jsonl").open():
        r = json.loads(line)
        if r["labels"]["lang"] == "en" and not r["labels"]["exact_dup_of"] and not r["labels"]["near_dup_of"]:
            rows.append({"id": r["id"], "text": r["text"]})
    return rows[:n]


def label(llm, text: str) -> float:
    """Expected 0-5 score under the labeller's first answer token."""
    prompt = EDU_PROMPT.format(text=text[:1000])  # the first 1,000 characters bound the prefill
    result = llm.chat([{"role": "user", "content": prompt}], temperature=0.0, max_new_tokens=1, logprobs=20)
    digits = {str(d): llm.tokenizer.encode(str(d), bos=False) for d in range(6)}
    ids = {ids[0]: int(d) for d, ids in digits.items() if len(ids) == 1}
    probs = {ids[t]: math.exp(lp) for t, lp in (result.logprobs[0].top or []) if t in ids}
    if not probs:
        return 0.0
    return sum(d * p for d, p in probs.items()) / sum(probs.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--model", default=None, help="a stored model name or path (default: the embedded SmolLM2)")
    p.add_argument("--out", default="data/web/quality")
    p.add_argument("--labels", default=None, help="reuse a labels.jsonl from an earlier run (skips the labeller)")
    args = p.parse_args()
    import corral
    from corral.cli import minilm_embed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = documents(args.docs)
    if args.labels:
        known = {r["id"]: r["score"] for r in map(json.loads, Path(args.labels).read_text().splitlines())}
        docs = [d for d in docs if d["id"] in known]
        scores, labeller = np.array([known[d["id"]] for d in docs]), json.loads(
            (Path(args.labels).parent / "agreement.json").read_text())["labeller"]
    else:
        llm = corral.load(args.model) if args.model else corral.load()
        scores, labeller = np.array([label(llm, d["text"]) for d in docs]), llm.name
    (out / "labels.jsonl").write_text("".join(json.dumps({"id": d["id"], "score": round(float(s), 4)}) + "\n"
                                              for d, s in zip(docs, scores)))
    emb = minilm_embed([d["text"] for d in docs])  # (N, 384)
    cut = int(0.8 * len(docs))
    scorer = train_scorer(emb[:cut], scores[:cut])
    scorer.save(out / "scorer.npz")
    threshold = float(np.median(scores))  # the labeller's own median: a keep/drop split with both sides populated
    report = {"labeller": labeller, "train": cut, "held": len(docs) - cut, "threshold": round(threshold, 4),
              "label_mean": round(float(scores.mean()), 4), "label_std": round(float(scores.std()), 4),
              "held_agreement": agreement(scorer(emb[cut:]), scores[cut:], threshold),
              "train_agreement": agreement(scorer(emb[:cut]), scores[:cut], threshold)}
    (out / "agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
