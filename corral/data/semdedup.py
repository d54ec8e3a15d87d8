"""Semantic deduplication, SemDeDup (Abbas et al. 2023, arXiv 2303.09540).

Embed every document (a unit vector, here all-MiniLM-L6-v2's), cluster the embeddings with k-means,
and within each cluster call two documents duplicates when their cosine similarity is at least
``threshold`` (the paper's 1 - eps). Clustering is what makes it affordable: pairs are compared only
inside a cluster, (N/k)^2 per cluster instead of N^2. Of each group of duplicates the first document in
global (shard, position) order is kept, as MinHash dedup does, where the paper keeps the one farthest
from the centroid; order keeps the result independent of how the shards were scheduled.

corral.data does not import corral.embed (layering), so the embedding function comes in from the
caller: ``corral curate`` passes corral.cli.minilm_embed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Embed = Callable[[list[str]], np.ndarray]
"""texts -> (N, dim) float32 unit rows."""


@dataclass
class SemDedupConfig:
    threshold: float = 0.9
    """Cosine similarity at or above which two documents of one cluster are duplicates."""
    docs_per_cluster: int = 50
    """k = ceil(N / docs_per_cluster) clusters (the paper: about 50,000 clusters for 440M images)."""
    seed: int = 0


def cluster(embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels (N,) for unit rows, scikit-learn's Lloyd with k-means++ starts, fixed seed."""
    from sklearn.cluster import KMeans

    if k <= 1 or len(embeddings) <= k:
        return np.zeros(len(embeddings), dtype=np.int64)
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(embeddings.astype(np.float64))


def semdedup(embeddings: np.ndarray, config: SemDedupConfig) -> list[int]:
    """For (N, dim) unit rows in global order: the index each document duplicates, or -1."""
    n = len(embeddings)
    dup_of = [-1] * n
    if n < 2:
        return dup_of
    k = max(1, -(-n // config.docs_per_cluster))
    labels = cluster(embeddings, k, config.seed)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)  # ascending: global order
        sims = embeddings[members] @ embeddings[members].T  # (m, m) cosine, rows are unit length
        for row in range(1, len(members)):
            earlier = np.flatnonzero(sims[row, :row] >= config.threshold)
            kept = [j for j in earlier if dup_of[members[j]] == -1]
            if kept:
                dup_of[members[row]] = int(members[kept[0]])
    return dup_of
