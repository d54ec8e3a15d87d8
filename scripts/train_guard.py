"""Train the embedded guard's head: `python scripts/train_guard.py [--shared DIR] [--cache DIR]`.

    examples (corral.safety.guard_data) -> fixed split (data/safety/guard_split.json)
      -> trunk features of each conversation block (corral.safety.embedded.features; cached per layer)
      -> one L2-regularised logistic regression per output (unsafe, S1..S14; unknown labels skipped)
      -> held-out precision/recall/F1 and the false-flag rate on benign look-alikes
      -> corral/safety/guard_head/{head.safetensors, config.json, metrics.json}

The head is a convex fit on frozen features (scikit-learn's lbfgs), not a network trained by
corral.train's loop. Embedding ~1,900 texts takes about 15 minutes on 2 busy cores; --cache keeps
the features between runs (keyed by the texts, so a changed example set recomputes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from corral.safety import guard_data  # noqa: E402
from corral.safety.embedded import HEAD_DIR, FeatureSpec, Head, conversation_block, features  # noqa: E402

SPEC = FeatureSpec(layers=tuple(range(1, 10)), max_tokens=64, last=(9,))
C = 0.003
"""Inverse L2 strength of every logistic regression."""
MODERATION_WEIGHT = 1.0
"""How many times a moderation row counts (the HH rows are keyword-selected, the moderation rows real text)."""
THRESHOLD = 0.65
"""P(unsafe) that flags. SPEC, C, MODERATION_WEIGHT and THRESHOLD were picked by `--cv` (5-fold cross-validation
on the training part only): the best moderation-row flagged F1 with at most ~10% of the look-alikes flagged
and flagged F1 over all rows >= 0.8. The held-out part was used once, for the figures of the pick."""
CV_SPEC = FeatureSpec(layers=tuple(range(1, 10)), max_tokens=64, last=(6, 9))
"""Every feature slice the grid draws on (blocks 1..9 of 30: the forward's cost does not grow)."""
GRID = {"spec": [FeatureSpec((9,)), FeatureSpec((6, 9), last=(9,)), FeatureSpec((5, 7, 9), last=(9,)),
                 FeatureSpec(tuple(range(1, 10))), SPEC],
        "C": [0.001, 0.003, 0.01], "moderation_weight": [1.0, 2.0, 3.0], "threshold": [0.5, 0.55, 0.6, 0.65, 0.7]}
SPLIT_FILE = guard_data.REPO_DATA / "guard_split.json"


def cached_features(llm, texts: list[str], spec: FeatureSpec, cache: Path) -> torch.Tensor:
    """(N, len(layers) * len(pooling) * dim) features; cache/features-<max_tokens>.pt keeps each text's vector
    per (block, pooling) (keyed by a hash of the text), so only new texts, blocks or poolings are embedded."""
    path = cache / f"features-{spec.max_tokens}.pt"
    store = torch.load(path) if path.exists() else {}  # (text hash, block, pooling) -> (dim,)
    keys = [hashlib.sha256(t.encode()).hexdigest()[:20] for t in texts]
    parts = spec.parts()
    todo = [i for i, k in enumerate(keys) if any((k, *part) not in store for part in parts)]
    if todo:
        started = time.perf_counter()
        fresh = features(llm, [texts[i] for i in todo], spec)
        print(f"embedded {len(todo)} texts ({spec}) in {time.perf_counter() - started:.0f} s")
        for row, i in zip(fresh, todo):
            for vector, part in zip(row.chunk(len(parts)), parts):
                store[(keys[i], *part)] = vector.clone()
        torch.save(store, path)
    return torch.stack([torch.cat([store[(k, *part)] for part in parts]) for k in keys])


def fit(x: torch.Tensor, targets: list[list[int | None]], row_weight: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic regression per output column on standardized x; rows with a None target are skipped,
    each row counts row_weight times (on top of the balanced class weights). Returns weight (K, F), bias (K,)."""
    from sklearn.linear_model import LogisticRegression

    weights, biases = [], []
    for k in range(len(targets[0])):
        rows = [i for i, t in enumerate(targets) if t[k] is not None]
        y = [targets[i][k] for i in rows]
        if len(set(y)) < 2:  # a category never seen positive: never fires
            weights.append(torch.zeros(x.shape[1]))
            biases.append(-10.0)
            continue
        model = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
        model.fit(x[rows].numpy(), y, sample_weight=[row_weight[i] for i in rows])
        weights.append(torch.tensor(model.coef_[0], dtype=torch.float32))
        biases.append(float(model.intercept_[0]))
    return torch.stack(weights), torch.tensor(biases)


def prf(pred: list[int], gold: list[int]) -> dict:
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3), "support": sum(gold)}


def evaluate(probs: torch.Tensor, examples: list, threshold: float) -> dict:
    """Held-out figures: flagged and unflagged P/R/F1 (all sources, and moderation alone), per category
    (where labelled), and the false-flag rate on benign look-alikes."""
    flagged = [int(p >= threshold) for p in probs[:, 0].tolist()]
    gold = [e.unsafe for e in examples]
    out = {"flagged": prf(flagged, gold), "unflagged": prf([1 - f for f in flagged], [1 - g for g in gold])}
    mod = [i for i, e in enumerate(examples) if e.id.startswith("mod:")]
    out["flagged_moderation_only"] = prf([flagged[i] for i in mod], [gold[i] for i in mod])
    out["categories"] = {}
    for k, code in enumerate(guard_data.CODES, 1):
        rows = [i for i, e in enumerate(examples) if e.labels[code] is not None]
        pred = [int(flagged[i] and probs[i, k] >= threshold) for i in rows]
        out["categories"][code] = prf(pred, [examples[i].labels[code] for i in rows])
    looks = [i for i, e in enumerate(examples) if e.id.startswith("look:")]
    out["lookalike_false_flags"] = {"flagged": sum(flagged[i] for i in looks), "of": len(looks)}
    return out


def cross_validate(x: torch.Tensor, examples: list) -> int:
    """5-fold cross-validation on the training part only (folds stratified by source and label): flagged F1
    on all rows and on the moderation rows, and look-alike false flags, for each GRID point and threshold."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.array([e.unsafe for e in examples])
    look = np.array([e.id.startswith("look:") for e in examples])
    mod = np.array([e.id.startswith("mod:") for e in examples])
    strata = [f"{e.id.split(':')[0]}{e.unsafe}" for e in examples]
    parts = CV_SPEC.parts()  # x's dim-wide column slices, in order
    dim = x.shape[1] // len(parts)
    for spec in GRID["spec"]:
        cols = [parts.index(part) for part in spec.parts()]
        features_ = torch.cat([x[:, j * dim:(j + 1) * dim] for j in cols], 1).numpy()
        for c in GRID["C"]:
            for w in GRID["moderation_weight"]:
                weight = np.where(mod, w, 1.0)
                p = np.zeros(len(examples))
                for a, b in StratifiedKFold(5, shuffle=True, random_state=0).split(features_, strata):
                    mu, sd = features_[a].mean(0), features_[a].std(0) + 1e-4
                    model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
                    model.fit((features_[a] - mu) / sd, y[a], sample_weight=weight[a])
                    p[b] = model.predict_proba((features_[b] - mu) / sd)[:, 1]
                for t in GRID["threshold"]:
                    flag = p >= t
                    f1 = [2 * (flag[m] & (y[m] == 1)).sum() / (flag[m].sum() + y[m].sum()) for m in (y >= 0, mod)]
                    print(f"mean {spec.layers} last {spec.last} C {c} moderation x{w} threshold {t}: flagged F1 "
                          f"{f1[0]:.3f}, moderation {f1[1]:.3f}, look-alikes {(flag & look).sum()}/{look.sum()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=Path("/work/shared/data"), help="folder with safety/ and preference/")
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: a fresh temp folder)")
    p.add_argument("--out", type=Path, default=HEAD_DIR)
    p.add_argument("--cv", action="store_true", help="print the 5-fold grid (GRID) on the training part; save nothing")
    args = p.parse_args(argv)
    import corral

    examples = guard_data.all_examples(args.shared)
    held = guard_data.split(examples)
    SPLIT_FILE.write_text(json.dumps({"seed": guard_data.SPLIT_SEED, "held_out": sorted(held)}, indent=0) + "\n")
    texts = [conversation_block(guard_data.role_of(e.id), e.text) for e in examples]
    cache = args.cache or Path(tempfile.mkdtemp(prefix="corral-guard-"))
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train = [i for i, e in enumerate(examples) if e.id not in held]
    if args.cv:
        x = cached_features(corral.load(), [texts[i] for i in train], CV_SPEC, cache)
        return cross_validate(x, [examples[i] for i in train])
    x = cached_features(corral.load(), texts, SPEC, cache)
    torch.set_num_threads(1)  # one thread from here on: the fit's float sums, and so the weights, are byte-stable
    threadpool_limits(1)
    test = [i for i, e in enumerate(examples) if e.id in held]
    mean, scale = x[train].mean(0), x[train].std(0).clamp_min(1e-4)
    z = (x - mean) / scale
    targets = [[e.unsafe] + [e.labels[c] for c in guard_data.CODES] for e in examples]
    row_weight = [MODERATION_WEIGHT if examples[i].id.startswith("mod:") else 1.0 for i in train]
    weight, bias = fit(z[train], [targets[i] for i in train], row_weight)
    head = Head(weight, bias, mean, scale, SPEC, guard_data.CODES, THRESHOLD)
    metrics = evaluate(head.probabilities(x[test]), [examples[i] for i in test], head.threshold)
    metrics["train_examples"], metrics["held_out_examples"] = len(train), len(test)
    head.save(args.out, {"C": C, "moderation_weight": MODERATION_WEIGHT, "split": str(SPLIT_FILE.relative_to(ROOT))})
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
