"""A text-quality classifier trained Llama 3's way: a language model labels a sample with an
educational-quality score, a fast model learns those labels, and the fast model scores everything.

Llama 3 (section 3.1.1) labelled web documents with Llama 2 and trained DistilRoBERTa on the labels;
FineWeb-Edu (Penedo et al. 2024, section 4) did the same with Llama 3 70B, a 0-5 educational score prompt
and a linear regression head on embeddings, keeping documents scored >= 3. Here the labeller is any
``text -> score`` function (``scripts/curation_quality_classifier.py`` uses a model run by Corral's engine)
and the fast model is ridge regression on all-MiniLM-L6-v2 embeddings, saved as an .npz (coef, intercept).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corral.data.documents import Document, Step
from corral.data.semdedup import Embed
from corral.errors import ConfigError

EDU_PROMPT = """Below is an extract from a web page. Rate its educational value for teaching at primary to \
grade school levels, from 0 to 5:
0: no educational value (ads, navigation, spam, adult content).
1: some basic information relevant to educational topics, mixed with ads or promotional material.
2: addresses elements pertinent to education but does not align closely with educational standards.
3: appropriate for educational use and introduces key concepts relevant to school curricula.
4: highly relevant and beneficial for educational purposes, like a chapter from a textbook or a tutorial.
5: outstanding in its educational value, perfectly suited for teaching at primary or grade school.

Extract:
{text}

Answer with one digit from 0 to 5."""
"""After FineWeb-Edu's annotation prompt (additive 5-point scale), condensed for a small labeller."""


@dataclass
class LinearScorer:
    coef: np.ndarray  # (dim,)
    intercept: float

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, dim) -> (N,) predicted scores."""
        return embeddings @ self.coef + self.intercept

    def save(self, path: str | Path) -> None:
        np.savez(path, coef=self.coef, intercept=np.array(self.intercept))

    @classmethod
    def load(cls, path: str | Path) -> LinearScorer:
        try:
            data = np.load(path)
            return cls(data["coef"], float(data["intercept"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"quality model {path}: not a saved LinearScorer ({exc})") from None


def train_scorer(embeddings: np.ndarray, scores: np.ndarray, alpha: float | None = None) -> LinearScorer:
    """Ridge regression of scores (N,) on embeddings (N, dim); ``alpha`` None picks it by leave-one-out
    cross-validation over 1e-3..1e3 (a few hundred labels against 384 dimensions overfit without it)."""
    from sklearn.linear_model import Ridge, RidgeCV

    model = (RidgeCV(alphas=np.logspace(-3, 3, 13)) if alpha is None else Ridge(alpha=alpha)).fit(embeddings, scores)
    return LinearScorer(np.asarray(model.coef_, dtype=np.float64), float(model.intercept_))


def agreement(predicted: np.ndarray, labels: np.ndarray, threshold: float = 3.0) -> dict:
    """Agreement with the labeller: Spearman rank correlation, and keep/drop accuracy at the threshold."""
    from scipy.stats import spearmanr

    keep_pred, keep_true = predicted >= threshold, labels >= threshold
    return {"spearman": round(float(spearmanr(predicted, labels).statistic), 4),
            "keep_accuracy": round(float((keep_pred == keep_true).mean()), 4),
            "mae": round(float(np.abs(predicted - labels).mean()), 4), "n": len(labels)}


@dataclass
class QualityConfig:
    model: str = ""
    """A LinearScorer .npz from scripts/curation_quality_classifier.py."""
    min_score: float = 3.0
    """Documents predicted below this are dropped ("low_quality"); FineWeb-Edu keeps >= 3."""
    action: str = "drop"
    """"drop", or "weight": keep everything and write metadata["quality_score"] for the mixer to use."""
    batch_size: int = 64


class QualityFilter(Step):
    name = "quality_classifier"

    def __init__(self, config: QualityConfig, embed: Embed | None):
        super().__init__()
        if embed is None:
            raise ConfigError("quality_classifier needs an embedding model; `corral curate` passes all-MiniLM-L6-v2")
        if config.action not in ("drop", "weight"):
            raise ConfigError(f"quality_classifier.action must be 'drop' or 'weight', got {config.action!r}")
        self.c, self.embed, self.scorer = config, embed, LinearScorer.load(config.model)

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in self.count(docs):
            batch.append(doc)
            if len(batch) == self.c.batch_size:
                yield from self._score(batch)
                batch = []
        yield from self._score(batch)

    def _score(self, batch: list[Document]) -> Iterator[Document]:
        if not batch:
            return
        scores = self.scorer(self.embed([d.text for d in batch]))
        for doc, score in zip(batch, scores.tolist()):
            doc.metadata["quality_score"] = round(score, 4)
            if self.c.action == "drop" and score < self.c.min_score:
                self.drop(doc, "low_quality")
            else:
                yield doc
