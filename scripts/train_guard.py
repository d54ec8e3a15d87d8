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

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from corral.safety import guard_data  # noqa: E402
from corral.safety.embedded import HEAD_DIR, FeatureSpec, Head, conversation_block, features  # noqa: E402

SPEC = FeatureSpec(layers=(9,), max_tokens=64)
C = 0.01
"""Inverse L2 strength of every logistic regression."""
THRESHOLD = 0.7
"""P(unsafe) that flags. SPEC.layers, C and THRESHOLD were picked by `--cv` (5-fold cross-validation on
the training part only: flagged F1 against false flags on the look-alikes): blocks 6, 9 and both,
C 0.003-0.1, thresholds 0.5-0.7."""
SPLIT_FILE = guard_data.REPO_DATA / "guard_split.json"


def cached_features(llm, texts: list[str], layers: tuple[int, ...], cache: Path) -> torch.Tensor:
    """(N, len(layers) * dim) features; each layer's block is kept in cache/<hash>-<layer>.pt."""
    key = hashlib.sha256(json.dumps([SPEC.max_tokens, texts]).encode()).hexdigest()[:16]
    missing = tuple(x for x in layers if not (cache / f"{key}-{x}.pt").exists())
    if missing:
        started = time.perf_counter()
        fresh = features(llm, texts, FeatureSpec(missing, SPEC.max_tokens))
        print(f"embedded {len(texts)} texts (layers {missing}) in {time.perf_counter() - started:.0f} s")
        for j, x in enumerate(missing):
            dim = fresh.shape[1] // len(missing)
            torch.save(fresh[:, j * dim:(j + 1) * dim].clone(), cache / f"{key}-{x}.pt")
    return torch.cat([torch.load(cache / f"{key}-{x}.pt") for x in layers], dim=1)


def fit(x: torch.Tensor, targets: list[list[int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic regression per output column on standardized x; rows with a None target are skipped.
    Returns weight (K, F), bias (K,)."""
    from sklearn.linear_model import LogisticRegression

    weights, biases = [], []
    for k in range(len(targets[0])):
        rows = [i for i, t in enumerate(targets) if t[k] is not None]
        y = [targets[i][k] for i in rows]
        if len(set(y)) < 2:  # a category never seen positive: never fires
            weights.append(torch.zeros(x.shape[1]))
            biases.append(-10.0)
            continue
        model = LogisticRegression(C=C, max_iter=2000, class_weight="balanced").fit(x[rows].numpy(), y)
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


def cross_validate(x: torch.Tensor, examples: list, rows: list[int]) -> int:
    """Flagged F1 and look-alike false flags of each (blocks, C, threshold), 5 folds of the training part."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.array([e.unsafe for e in examples])
    look = np.array([e.id.startswith("look:") for e in examples])
    dim = x.shape[1] // 2
    for name, cols in (("6", slice(0, dim)), ("9", slice(dim, 2 * dim)), ("6+9", slice(0, 2 * dim))):
        features_ = x[rows][:, cols].numpy()
        for c in (0.003, 0.01, 0.03, 0.1):
            p = np.zeros(len(rows))
            for a, b in StratifiedKFold(5, shuffle=True, random_state=0).split(features_, y * 2 + look):
                mu, sd = features_[a].mean(0), features_[a].std(0) + 1e-4
                model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
                p[b] = model.fit((features_[a] - mu) / sd, y[a]).predict_proba((features_[b] - mu) / sd)[:, 1]
            for t in (0.5, 0.6, 0.7):
                flag = p >= t
                f1 = 2 * (flag & (y == 1)).sum() / (flag.sum() + y.sum())
                print(f"blocks {name:4} C {c:<6} threshold {t}: flagged F1 {f1:.3f}, "
                      f"look-alikes flagged {(flag & look).sum()}/{look.sum()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=Path("/work/shared/data"), help="folder with safety/ and preference/")
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: a fresh temp folder)")
    p.add_argument("--out", type=Path, default=HEAD_DIR)
    p.add_argument("--cv", action="store_true", help="print the 5-fold grid over blocks, C and threshold; save nothing")
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
        return cross_validate(cached_features(corral.load(), texts, (6, 9), cache), [examples[i] for i in train],
                              train)
    x = cached_features(corral.load(), texts, SPEC.layers, cache)
    test = [i for i, e in enumerate(examples) if e.id in held]
    mean, scale = x[train].mean(0), x[train].std(0).clamp_min(1e-4)
    z = (x - mean) / scale
    targets = [[e.unsafe] + [e.labels[c] for c in guard_data.CODES] for e in examples]
    weight, bias = fit(z[train], [targets[i] for i in train])
    head = Head(weight, bias, mean, scale, SPEC, guard_data.CODES, THRESHOLD)
    metrics = evaluate(head.probabilities(x[test]), [examples[i] for i in test], head.threshold)
    metrics["train_examples"], metrics["held_out_examples"] = len(train), len(test)
    head.save(args.out, {"C": C, "split": str(SPLIT_FILE.relative_to(ROOT))})
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
