"""Metrics against lm-evaluation-harness's own functions (a test-only peer)."""

import math
import random
import re

import pytest

from corral.eval import metrics

lm_metrics = pytest.importorskip("lm_eval.api.metrics")


def test_acc_norm_divides_by_choice_characters_without_the_delimiter():
    # raw: choice 0 wins; per character: choice 1 (-6/12 = -0.5 > -5/4)
    assert metrics.choice_scores([-5.0, -6.0], ["abcd", "abcdefghijkl"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    assert metrics.argmax([-1.0, -1.0, -2.0]) == 0 and metrics.argmax([-3.0, -1.0, -1.0]) == 1


def test_mean_stderr_matches_lm_eval():
    values = [random.Random(3).random() for _ in range(37)]
    mean, stderr = metrics.mean_stderr(values)
    assert mean == pytest.approx(lm_metrics.mean(values))
    assert stderr == pytest.approx(lm_metrics.mean_stderr(values))
    assert metrics.mean_stderr([1.0]) == (1.0, 0.0)


def test_mc2_matches_lm_eval_truthfulqa_and_does_not_underflow():
    utils = pytest.importorskip("lm_eval.tasks.truthfulqa.utils")
    lls, labels = [-12.0, -9.5, -20.0, -8.0, -30.0], [1, 1, 0, 0, 0]
    want = utils.process_results_mc2({"mc2_targets": {"labels": labels}}, [(x, False) for x in lls])["acc"]
    assert metrics.mc2_score(lls, labels) == pytest.approx(want)
    assert metrics.mc2_score([-2000.0, -2001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_perplexities_match_lm_eval_weighted_aggregations():
    texts = ["The cat sat on the mat.", "Über café naïve — déjà vu!\nsecond line"]
    lls = [-31.5, -70.25]
    got = metrics.perplexities(lls, texts)
    words = [(ll, len(re.split(r"\s+", t))) for ll, t in zip(lls, texts)]
    nbytes = [(ll, len(t.encode("utf-8"))) for ll, t in zip(lls, texts)]
    assert got["word_perplexity"] == pytest.approx(lm_metrics.weighted_perplexity(words))
    assert got["byte_perplexity"] == pytest.approx(lm_metrics.weighted_perplexity(nbytes))
    assert got["bits_per_byte"] == pytest.approx(lm_metrics.bits_per_byte(nbytes))
