"""Metrics of the log-likelihood tasks, defined as lm-evaluation-harness defines them.

acc: the choice with the highest summed log-probability is the gold one. acc_norm: the same after
dividing each log-probability by its choice's length in characters (the choice string, without the
" " that joins it to the prompt; Brown et al. 2020 normalise per token, lm-eval per character).
mc2 (TruthfulQA, Lin et al. 2021): the probability mass on the true answers, sum p(true) /
(sum p(true) + sum p(false)). Stderr of a mean: sample standard deviation / sqrt(n).
Perplexities (lm-eval's weighted perplexity): exp(-sum log p / sum of words or bytes); bits per byte =
-sum log p / (sum bytes * ln 2); words are whitespace-separated pieces, bytes UTF-8 bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of ties, as numpy's argmax


def choice_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """{"acc", "acc_norm"} of one example from its choices' log-likelihoods."""
    normed = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    return {"acc": float(argmax(lls) == gold), "acc_norm": float(argmax(normed) == gold)}


def mc2_score(lls: Sequence[float], labels: Sequence[int]) -> float:
    """Probability mass on the true answers (labels 1), normalised over all listed answers."""
    peak = max(lls)
    probs = [math.exp(ll - peak) for ll in lls]  # shifted by the peak: the ratio is unchanged, nothing underflows
    true = sum(p for p, label in zip(probs, labels) if label == 1)
    return true / sum(probs)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); stderr is 0 for fewer than two values."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def word_count(text: str) -> int:
    return len(re.split(r"\s+", text))


def perplexities(logprobs: Sequence[float], texts: Sequence[str]) -> dict[str, float]:
    """word_perplexity, byte_perplexity, bits_per_byte over documents with total log p `logprobs`."""
    total = sum(logprobs)
    words = sum(word_count(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
            "bits_per_byte": -total / nbytes / math.log(2)}
