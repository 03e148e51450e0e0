"""Score aggregation against hand-computed cases."""

from __future__ import annotations

import random
from statistics import mean

import pytest

from orpolab.evaluate.generate import repeated_ngram_fraction
from orpolab.evaluate.stats import bootstrap_mean_ci, judge_agreement, paired_comparison


def test_bootstrap_of_a_constant_is_that_constant():
    assert bootstrap_mean_ci([3.0] * 7) == (3.0, 3.0)


def test_bootstrap_interval_matches_a_direct_resampling():
    values = [1.0, 2.0, 4.0, 8.0]
    lo, hi = bootstrap_mean_ci(values, n_resamples=200, seed=5)
    rng = random.Random(5)
    means = sorted(mean(values[rng.randrange(4)] for _ in range(4)) for _ in range(200))
    assert (lo, hi) == (means[5], means[194])  # 2.5th and 97.5th percentiles of 200 resamples
    assert lo < mean(values) < hi


def test_paired_comparison_hand_computed():
    winner = [5, 4, 3, None, 2]
    base = [3, 4, 4, 1, 2]
    out = paired_comparison(winner, base, n_resamples=500)
    # pairs: (5,3) (4,4) (3,4) (2,2); the one with a missing verdict is left out
    assert (out["n"], out["missing"]) == (4, 1)
    assert (out["wins"], out["ties"], out["losses"]) == (1, 2, 1)
    assert out["mean_diff"] == pytest.approx((2 + 0 - 1 + 0) / 4)
    assert out["mean_winner"] == pytest.approx(3.5) and out["mean_base"] == pytest.approx(3.25)
    assert -1 <= out["ci_low"] <= out["mean_diff"] <= out["ci_high"] <= 2


def test_judge_agreement_with_checked_answers():
    scores = [5, 4, 1, 2, None, 5]
    correct = [True, False, False, True, True, True]
    out = judge_agreement(scores, correct, threshold=4)
    # judged good: T T F F _ T vs correct T F F T _ T -> agree on 1st, 3rd, 6th of 5 judged
    assert out["n"] == 5 and out["agreement"] == pytest.approx(3 / 5)
    assert out["mean_score_correct"] == pytest.approx((5 + 2 + 5) / 3)
    assert out["mean_score_incorrect"] == pytest.approx((4 + 1) / 2)


def test_repeated_ngrams():
    assert repeated_ngram_fraction("a b c d e") == 0.0
    text = "x = 1. x = 1. x = 1."
    # words: x = 1. x = 1. x = 1. -> 7 trigrams, 3 distinct
    assert repeated_ngram_fraction(text) == pytest.approx(1 - 3 / 7)
    assert repeated_ngram_fraction("too short") == 0.0
