"""Score aggregation against hand-computed cases."""

from __future__ import annotations

import random
from statistics import mean

import numpy as np
import pytest

from orpolab.evaluate.generate import repeated_ngram_fraction
from orpolab.evaluate.stats import (
    auc,
    bootstrap_mean_ci,
    figure_text,
    length_regression,
    paired_comparison,
    pairwise_preference,
)


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


def test_repeated_ngrams():
    assert repeated_ngram_fraction("a b c d e") == 0.0
    text = "x = 1. x = 1. x = 1."
    # words: x = 1. x = 1. x = 1. -> 7 trigrams, 3 distinct
    assert repeated_ngram_fraction(text) == pytest.approx(1 - 3 / 7)
    assert repeated_ngram_fraction("too short") == 0.0


# ------------------------------------------------------------------ pairwise preference


def test_pairwise_preference_hand_computed():
    chosen = [5, 4, 3, 2, 1, None]
    rejected = [3, 3, 3, 4, 0, 2]
    out = pairwise_preference(chosen, rejected, n_resamples=400)
    # (5,3) higher, (4,3) higher, (3,3) tie, (2,4) lower, (1,0) higher; the pair without a verdict is left out
    assert (out["n"], out["missing"]) == (5, 1)
    assert (out["p_chosen_higher"], out["p_tie"], out["p_rejected_higher"]) == pytest.approx((3 / 5, 1 / 5, 1 / 5))
    assert out["value"] == pytest.approx((3 + 0.5) / 5)  # 0.7
    assert 0 <= out["ci_low"] <= out["value"] <= out["ci_high"] <= 1


def test_pairwise_interval_matches_a_direct_paired_resampling():
    rng = random.Random(3)
    chosen = [rng.randint(1, 5) for _ in range(40)]
    rejected = [rng.randint(1, 5) for _ in range(40)]
    out = pairwise_preference(chosen, rejected, n_resamples=300, seed=11)
    # The same draws (numpy's generator, seed 11), each resample's figure counted pair by pair.
    draws = np.random.default_rng(11).integers(0, 40, size=(300, 40))
    figures = sorted(sum(1.0 if chosen[i] > rejected[i] else 0.5 if chosen[i] == rejected[i] else 0.0
                         for i in row) / 40 for row in draws)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((figures[7], figures[291]))  # 2.5th, 97.5th of 300


def test_a_constant_judge_is_exactly_chance():
    out = pairwise_preference([3] * 25, [3] * 25)
    assert out["value"] == 0.5 and (out["ci_low"], out["ci_high"]) == (0.5, 0.5)
    assert out["p_tie"] == 1.0 and out["better_than_chance"] is False
    assert figure_text(out) == "0.500 [0.50, 0.50]"


def test_a_judge_that_always_prefers_chosen_is_better_than_chance():
    out = pairwise_preference([5] * 30, [1] * 30)
    assert out["value"] == 1.0 and out["ci_low"] == 1.0 and out["better_than_chance"] is True


def test_pairwise_without_scored_pairs_has_no_number():
    out = pairwise_preference([None, 4], [3, None])
    assert out == {"n": 0, "missing": 2, "undefined": "no scored pairs"}
    assert figure_text(out) == "undefined (no scored pairs)"


# ------------------------------------------------------------------ AUC


def brute_force_auc(scores: list[float], correct: list[bool]) -> float:
    """Every (right, wrong) pair: 1 if the right answer is scored higher, ½ if equal."""
    right = [s for s, c in zip(scores, correct, strict=True) if c]
    wrong = [s for s, c in zip(scores, correct, strict=True) if not c]
    return sum(1.0 if r > w else 0.5 if r == w else 0.0 for r in right for w in wrong) / (len(right) * len(wrong))


def rank_sum_auc(scores: list[float], correct: list[bool]) -> float:
    """Mann–Whitney U from mid-ranks (ties share their average rank), divided by n_right·n_wrong."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    n_right = sum(correct)
    n_wrong = len(correct) - n_right
    u = sum(r for r, c in zip(ranks, correct, strict=True) if c) - n_right * (n_right + 1) / 2
    return u / (n_right * n_wrong)


def test_auc_hand_computed():
    # right: 5, 3; wrong: 3, 1 -> pairs (5,3) 1, (5,1) 1, (3,3) ½, (3,1) 1 -> 3.5 / 4
    out = auc([5, 3, 3, 1, None], [True, True, False, False, True], n_resamples=200)
    assert (out["n"], out["n_right"], out["n_wrong"], out["missing"]) == (4, 2, 2, 1)
    assert out["value"] == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("levels", [5, None])  # a judge's few score levels, and continuous scores
def test_auc_equals_pair_count_and_mann_whitney(levels):
    rng = random.Random(7)
    correct = [rng.random() < 0.4 for _ in range(60)]
    scores = [(rng.randint(1, levels) if levels else rng.gauss(0, 1)) + (c if levels else 0.8 * c) for c in correct]
    out = auc(scores, correct, n_resamples=300)
    assert out["value"] == pytest.approx(brute_force_auc(scores, correct), abs=1e-12)
    assert out["value"] == pytest.approx(rank_sum_auc(scores, correct), abs=1e-12)
    assert 0 <= out["ci_low"] <= out["value"] <= out["ci_high"] <= 1


def test_auc_perfect_and_reversed_orderings():
    assert auc([5, 4, 2, 1], [True, True, False, False])["value"] == 1.0
    assert auc([5, 4, 2, 1], [False, False, True, True])["value"] == 0.0
    assert auc([3, 3, 3, 3], [False, True, False, True])["value"] == 0.5


def test_auc_bootstrap_is_stratified():
    # A single right answer: an unstratified resample would often draw no right answer at all.
    out = auc([4, 1, 2, 3, 1, 2], [True, False, False, False, False, False], n_resamples=500, seed=2)
    assert out["value"] == 1.0 and (out["ci_low"], out["ci_high"]) == (1.0, 1.0)


def test_auc_with_one_class_is_undefined():
    out = auc([5, 4, None], [True, True, False])
    assert out == {"n": 2, "n_right": 2, "n_wrong": 0, "missing": 1, "undefined": "one class"}
    assert "value" not in out
    assert figure_text(out) == "undefined (one class)"


def test_figure_text():
    assert figure_text({"value": 0.7312, "ci_low": 0.6512, "ci_high": 0.8049}) == "0.731 [0.65, 0.80]"
    entry = {"slope": 0.01234, "slope_ci_low": 0.0051, "slope_ci_high": 0.0199}
    assert figure_text(entry, "slope", 4) == "0.0123 [0.005, 0.020]"


def test_calibration_figures_are_deterministic_for_a_seed():
    rng = random.Random(1)
    a = [rng.randint(1, 5) for _ in range(50)]
    b = [rng.randint(1, 5) for _ in range(50)]
    c = [rng.random() < 0.5 for _ in range(50)]
    x = [rng.gauss(0, 10) for _ in range(50)]
    for f, args in ((pairwise_preference, (a, b)), (auc, (a, c)), (length_regression, (a, x))):
        assert f(*args, seed=4) == f(*args, seed=4)
        assert f(*args, seed=4) != f(*args, seed=5)  # the interval moves with the seed


# ------------------------------------------------------------------ length regression


def test_length_regression_equals_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 20, size=80)
    y = 0.3 + 0.04 * x + rng.normal(0, 1, size=80)
    out = length_regression(y.tolist(), x.tolist(), n_resamples=500)
    (intercept, slope), *_ = np.linalg.lstsq(np.column_stack([np.ones(80), x]), y, rcond=None)
    assert out["intercept"] == pytest.approx(intercept, rel=1e-10, abs=1e-12)
    assert out["slope"] == pytest.approx(slope, rel=1e-10, abs=1e-12)
    assert out["intercept_ci_low"] <= out["intercept"] <= out["intercept_ci_high"]
    assert out["slope_ci_low"] <= out["slope"] <= out["slope_ci_high"]
    assert (out["length_diff_min"], out["length_diff_max"]) == (x.min(), x.max())
    assert out["n"] == 80 and out["missing"] == 0


def test_length_regression_of_an_exact_line():
    # score diff = 2 + 0.5 * length diff on every prompt: every resample fits the same line.
    x = [-4, -2, 0, 2, 4, 6]
    out = length_regression([2 + 0.5 * d for d in x], x, n_resamples=300)
    assert out["intercept"] == pytest.approx(2) and out["slope"] == pytest.approx(0.5)
    assert out["slope_ci_low"] == pytest.approx(0.5) and out["slope_ci_high"] == pytest.approx(0.5)
    assert out["intercept_ci_low"] == pytest.approx(2) and out["intercept_ci_high"] == pytest.approx(2)
    assert figure_text(out, "slope") == "0.500 [0.50, 0.50]"


def test_length_regression_range_and_extrapolation_flag():
    x = list(range(21))  # 0..20: 5th percentile 1, 95th 19 (linear interpolation at 0.05·20 and 0.95·20)
    out = length_regression([0.1 * d for d in x], x, n_resamples=100)
    assert (out["length_diff_p5"], out["length_diff_p95"]) == pytest.approx((1.0, 19.0))
    assert out["zero_outside_central_90"] is True  # 0 lies below the central 90%: the intercept extrapolates
    centred = [d - 10 for d in x]
    assert length_regression([0.1 * d for d in centred], centred, n_resamples=100)["zero_outside_central_90"] is False


def test_length_regression_degenerate_cases():
    assert length_regression([1.0, 2.0], [3, 4]) == {"n": 2, "missing": 0, "undefined": "fewer than 3 prompts"}
    assert length_regression([1.0, 2.0, None, 0.0], [3, 4, 5, None])["undefined"] == "fewer than 3 prompts"
    out = length_regression([1.0, 2.0, 3.0], [7, 7, 7])
    assert out["undefined"] == "all length differences equal" and "slope" not in out
