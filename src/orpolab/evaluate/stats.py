"""Score aggregation for the evaluation: paired bootstrap intervals, win/tie/loss, agreement.

Pure functions on plain lists so they can be checked against hand-computed cases.
"""

from __future__ import annotations

import random
from statistics import mean


def bootstrap_mean_ci(values: list[float], n_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample items with replacement."""
    if not values:
        raise ValueError("no values to bootstrap")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(mean(values[rng.randrange(n)] for _ in range(n)) for _ in range(n_resamples))
    lo_idx = int((1 - level) / 2 * n_resamples)
    hi_idx = min(n_resamples - 1, int((1 + level) / 2 * n_resamples) - 1)
    return means[lo_idx], means[hi_idx]


def paired_comparison(winner: list[float], base: list[float], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Winner minus base on the same prompts: mean difference, its bootstrap CI, wins/ties/losses.

    Pairs where either score is missing (``None``, e.g. an unparsable verdict) are left out and
    counted, so a broken verdict never counts as a loss or a win.
    """
    if len(winner) != len(base):
        raise ValueError("paired scores must have the same length")
    pairs = [(w, b) for w, b in zip(winner, base, strict=True) if w is not None and b is not None]
    diffs = [w - b for w, b in pairs]
    out = {"n": len(pairs), "missing": len(winner) - len(pairs),
           "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}
    if diffs:
        lo, hi = bootstrap_mean_ci(diffs, n_resamples, seed=seed)
        out.update({"mean_winner": mean(w for w, _ in pairs), "mean_base": mean(b for _, b in pairs),
                    "mean_diff": mean(diffs), "ci_low": lo, "ci_high": hi})
    return out


def judge_agreement(scores: list[int | None], correct: list[bool], threshold: float) -> dict:
    """How often the judge's verdict (score >= threshold means "good") matches the checked answer."""
    pairs = [(s >= threshold, c) for s, c in zip(scores, correct, strict=True) if s is not None]
    if not pairs:
        return {"n": 0}
    right = [s for s, c in zip(scores, correct, strict=True) if s is not None and c]
    wrong = [s for s, c in zip(scores, correct, strict=True) if s is not None and not c]
    return {
        "n": len(pairs),
        "agreement": mean(float(j == c) for j, c in pairs),
        "mean_score_correct": mean(right) if right else None,
        "mean_score_incorrect": mean(wrong) if wrong else None,
    }
