"""Score aggregation for the evaluation: paired bootstrap intervals, win/tie/loss,
the judge's calibration figures (pairwise preference, AUC) and a length-sensitivity regression.

Pure functions on plain lists so they can be checked against hand-computed cases.
"""

from __future__ import annotations

import random
from statistics import mean

import numpy as np


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


# ------------------------------------------------------------------ judge calibration and length figures
#
# The bootstraps below draw their resamples with numpy's seeded generator, a block of resamples at a
# time, so they are fast for a thousand resamples and still the same numbers for the same seed.

# Cells (resamples x items) drawn per block: bounds the memory of a bootstrap over many items.
_BLOCK_CELLS = 1 << 21


def _check_level(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")


def _percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of bootstrap statistics, by the same order statistics as
    :func:`bootstrap_mean_ci`, so every interval of the report is read the same way."""
    ordered = np.sort(stats)
    k = len(ordered)
    lo_idx = int((1 - level) / 2 * k)
    hi_idx = min(k - 1, max(lo_idx, int((1 + level) / 2 * k) - 1))
    return float(ordered[lo_idx]), float(ordered[hi_idx])


def _resample_blocks(rng: np.random.Generator, n: int, n_resamples: int):
    """Index arrays of shape (block, n), drawn with replacement, covering ``n_resamples`` resamples in order."""
    block = max(1, _BLOCK_CELLS // max(1, n))
    for start in range(0, n_resamples, block):
        yield rng.integers(0, n, size=(min(block, n_resamples - start), n))


def pairwise_preference(chosen_scores: list[float | None], rejected_scores: list[float | None],
                        n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """How often the judge scores the chosen answer of a prompt above its rejected one.

    The figure is P(chosen higher) + ½·P(tie): chance is 0.5, and a judge that gives every answer
    the same score gets exactly 0.5 (all ties), however many pairs it saw, rather than a tie-rate
    artefact. Pairs with an unparsable verdict (``None``) are left out and counted as ``missing``.
    The interval is a paired percentile bootstrap over prompts; ``better_than_chance`` asks for its
    lower bound above 0.5, so a judge whose interval reaches 0.5 is reported as no better than chance.
    """
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError("chosen and rejected scores must have the same length")
    _check_level(n_resamples, level)
    pairs = [(c, r) for c, r in zip(chosen_scores, rejected_scores, strict=True) if c is not None and r is not None]
    n = len(pairs)
    out: dict = {"n": n, "missing": len(chosen_scores) - n}
    if n == 0:
        return {**out, "undefined": "no scored pairs"}
    # Per prompt: 1 when chosen is scored higher, ½ for a tie, 0 when rejected is.
    wins = np.array([1.0 if c > r else 0.5 if c == r else 0.0 for c, r in pairs])
    rng = np.random.default_rng(seed)
    boots = np.concatenate([wins[idx].mean(axis=1) for idx in _resample_blocks(rng, n, n_resamples)])
    lo, hi = _percentile_interval(boots, level)
    higher, tie = int(np.sum(wins == 1.0)), int(np.sum(wins == 0.5))
    return {**out, "p_chosen_higher": higher / n, "p_tie": tie / n, "p_rejected_higher": (n - higher - tie) / n,
            "value": float(wins.mean()), "ci_low": lo, "ci_high": hi, "level": level,
            "better_than_chance": bool(lo > 0.5)}


def _auc_from_counts(pos_counts: np.ndarray, neg_counts: np.ndarray) -> np.ndarray:
    """AUC from counts per distinct score, in increasing score order (last axis), row by row.

    P(a right answer's score > a wrong one's) + ½·P(equal) = Σ_a right_a · (wrong below a + ½·wrong at a)
    / (n_right·n_wrong): linear in the number of distinct scores, so a bootstrap stays cheap for a
    judge's few score levels and for continuous scores alike.
    """
    wrong_below = np.cumsum(neg_counts, axis=-1) - neg_counts
    n_pos, n_neg = pos_counts.sum(axis=-1), neg_counts.sum(axis=-1)
    return (pos_counts * (wrong_below + 0.5 * neg_counts)).sum(axis=-1) / (n_pos * n_neg)


def auc(scores: list[float | None], correct: list[bool], n_resamples: int = 1000, seed: int = 0,
        level: float = 0.95) -> dict:
    """How well the judge's score separates right answers from wrong ones, with no threshold.

    The area under the ROC curve: the probability that a right answer is scored above a wrong one,
    ties counting ½; equal to Mann–Whitney U / (n_right·n_wrong). 0.5 is chance, 1 a perfect
    ordering. Unlike an agreement rate it does not depend on where "good" starts on the scale.
    Answers with an unparsable verdict (``None``) are left out and counted. The interval is a
    stratified percentile bootstrap: right and wrong answers are resampled separately, so every
    resample has both classes and the class sizes stay as measured. With only one class there is
    no AUC: the entry says ``undefined: one class`` and carries no number.
    """
    if len(scores) != len(correct):
        raise ValueError("scores and correctness must have the same length")
    _check_level(n_resamples, level)
    kept = [(float(s), bool(c)) for s, c in zip(scores, correct, strict=True) if s is not None]
    pos = [s for s, c in kept if c]
    neg = [s for s, c in kept if not c]
    out: dict = {"n": len(kept), "n_right": len(pos), "n_wrong": len(neg), "missing": len(scores) - len(kept)}
    if not pos or not neg:
        return {**out, "undefined": "one class"}
    codes = np.unique(np.array(pos + neg), return_inverse=True)[1]  # ranks of the distinct scores
    pos_codes, neg_codes = codes[: len(pos)], codes[len(pos):]
    k = int(codes.max()) + 1
    point = float(_auc_from_counts(np.bincount(pos_codes, minlength=k).astype(float),
                                   np.bincount(neg_codes, minlength=k).astype(float)))
    rng = np.random.default_rng(seed)

    def counts(idx: np.ndarray, class_codes: np.ndarray) -> np.ndarray:
        rows = idx.shape[0]
        flat = class_codes[idx] + k * np.arange(rows)[:, None]
        return np.bincount(flat.ravel(), minlength=rows * k).reshape(rows, k).astype(float)

    boots = []
    block = max(1, _BLOCK_CELLS // max(len(pos), len(neg), k))
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        # Per block, right answers' resamples, then wrong answers': one generator, fixed by the seed.
        pos_idx = rng.integers(0, len(pos), size=(rows, len(pos)))
        neg_idx = rng.integers(0, len(neg), size=(rows, len(neg)))
        boots.append(_auc_from_counts(counts(pos_idx, pos_codes), counts(neg_idx, neg_codes)))
    lo, hi = _percentile_interval(np.concatenate(boots), level)
    return {**out, "value": point, "ci_low": lo, "ci_high": hi, "level": level}


def figure_text(entry: dict, key: str = "value", digits: int = 3) -> str:
    """A figure and its interval for the report, e.g. ``0.731 [0.65, 0.80]``.

    The interval is printed with one digit less than the figure (it is less certain than its last
    digit). An entry without a number prints why: ``undefined (one class)``. The interval of
    ``key`` is ``ci_low``/``ci_high`` for ``value`` and ``<key>_ci_low``/``<key>_ci_high`` otherwise
    (``figure_text(regression, "slope", 4)``).
    """
    if "undefined" in entry:
        return f"undefined ({entry['undefined']})"
    prefix = "" if key == "value" else f"{key}_"
    lo, hi = entry.get(prefix + "ci_low"), entry.get(prefix + "ci_high")
    if lo is None or hi is None:
        return f"{entry[key]:.{digits}f}"
    ci = max(0, digits - 1)
    return f"{entry[key]:.{digits}f} [{lo:.{ci}f}, {hi:.{ci}f}]"


def _ols_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intercept and slope of ``y`` on ``x`` by ordinary least squares, row by row (NaN where x is constant)."""
    mx, my = x.mean(axis=-1, keepdims=True), y.mean(axis=-1, keepdims=True)
    sxx = ((x - mx) ** 2).sum(axis=-1)
    sxy = ((x - mx) * (y - my)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), np.nan)
    return my[..., 0] - slope * mx[..., 0], slope


def length_regression(score_diffs: list[float | None], length_diffs: list[float | None], n_resamples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict:
    """How much of the judge-score gain goes with longer answers: a sensitivity figure, labelled as such.

    Per prompt, trained minus base judge score is regressed by ordinary least squares on trained
    minus base answer length (tokens): ``score_diff ≈ intercept + slope · length_diff``. The slope
    is the score gained per extra token; the intercept is the gain at equal length. This is NOT
    AlpacaEval's length-controlled win rate (a GLM on pairwise preferences with a length term):
    it is a linear fit on per-prompt score differences, to show whether a gain might be a length
    effect. The intercept is read at length difference 0; when 0 lies outside the central 90% of
    the observed length differences (``zero_outside_central_90``), it is an extrapolation and the
    report says so. Intervals are a paired percentile bootstrap over prompts; resamples whose
    length differences are all equal have no slope and are left out (counted). Prompts with a
    missing value (``None``) are left out and counted. Fewer than 3 prompts, or no spread in
    length, give a reason and no slope.
    """
    if len(score_diffs) != len(length_diffs):
        raise ValueError("score and length differences must have the same length")
    _check_level(n_resamples, level)
    kept = [(float(s), float(d)) for s, d in zip(score_diffs, length_diffs, strict=True)
            if s is not None and d is not None]
    n = len(kept)
    out: dict = {"n": n, "missing": len(score_diffs) - n}
    if n < 3:
        return {**out, "undefined": "fewer than 3 prompts"}
    y = np.array([s for s, _ in kept], dtype=np.float64)
    x = np.array([d for _, d in kept], dtype=np.float64)
    if np.all(x == x[0]):
        return {**out, "undefined": "all length differences equal"}
    intercept, slope = (float(v) for v in _ols_rows(x, y))
    rng = np.random.default_rng(seed)
    fits = [_ols_rows(x[idx], y[idx]) for idx in _resample_blocks(rng, n, n_resamples)]
    b_int = np.concatenate([f[0] for f in fits])
    b_slope = np.concatenate([f[1] for f in fits])
    ok = ~np.isnan(b_slope)
    if ok.any():
        int_lo, int_hi = _percentile_interval(b_int[ok], level)
        slope_lo, slope_hi = _percentile_interval(b_slope[ok], level)
    else:  # every resample drew a single length difference: no interval to give
        int_lo = int_hi = slope_lo = slope_hi = None
    p5, p95 = (float(v) for v in np.percentile(x, [5, 95]))
    return {**out, "intercept": intercept, "intercept_ci_low": int_lo, "intercept_ci_high": int_hi,
            "slope": slope, "slope_ci_low": slope_lo, "slope_ci_high": slope_hi, "level": level,
            "length_diff_min": float(x.min()), "length_diff_max": float(x.max()),
            "length_diff_p5": p5, "length_diff_p95": p95, "zero_outside_central_90": bool(not p5 <= 0.0 <= p95),
            "degenerate_resamples": int((~ok).sum())}
