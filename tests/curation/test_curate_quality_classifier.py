"""The quality classifier's fast half: ridge regression on embeddings, the step that filters or weights."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from corral.data.documents import Document
from corral.data.quality_classifier import LinearScorer, QualityConfig, QualityFilter, agreement, train_scorer
from corral.errors import ConfigError

WORDS = ["photosynthesis", "equation", "history", "cells", "theorem", "buy", "sale", "discount", "click", "deal"]


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A deterministic 10-dim embedding: counts of the words above (stands in for MiniLM's 384 dims)."""
    return np.array([[t.lower().split().count(w) for w in WORDS] for t in texts], dtype=np.float64)


def test_ridge_recovers_a_linear_score_and_agreement_is_perfect():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = x @ np.arange(8) / 10 + 2.5
    scorer = train_scorer(x[:160], y[:160], alpha=1e-6)
    result = agreement(scorer(x[160:]), y[160:], threshold=2.5)
    assert result["spearman"] > 0.999 and result["keep_accuracy"] == 1.0


def test_step_drops_low_scores_or_weights_by_them(tmp_path):
    texts = ["the theorem and the equation of cells"] * 10 + ["buy now sale discount click deal"] * 10
    scores = np.array([4.0] * 10 + [0.5] * 10)
    train_scorer(bag_of_words(texts), scores, alpha=0.01).save(tmp_path / "m.npz")
    docs = [Document("history of cells and photosynthesis", "good"), Document("click for a deal, buy", "bad")]
    step = QualityFilter(QualityConfig(model=str(tmp_path / "m.npz")), bag_of_words)
    assert [d.id for d in step.run(docs)] == ["good"] and step.stats.dropped == {"low_quality": 1}
    weigh = QualityFilter(QualityConfig(model=str(tmp_path / "m.npz"), action="weight"), bag_of_words)
    kept = list(weigh.run([Document(d.text, d.id) for d in docs]))
    assert len(kept) == 2 and kept[0].metadata["quality_score"] > 3 > kept[1].metadata["quality_score"]


def test_missing_model_or_embedder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="embedding model"):
        QualityFilter(QualityConfig(model="x.npz"), None)
    (tmp_path / "bad.npz").write_bytes(zlib.compress(b"nope"))
    with pytest.raises(ConfigError, match="not a saved LinearScorer"):
        LinearScorer.load(tmp_path / "bad.npz")
