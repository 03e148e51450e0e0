"""The judge measured against people: blind pairwise ratings turned into the report's figures.

A rating says, for one prompt and one pair of models shown as A and B, which answer the person
preferred. Everything here is on *outcomes* seen from the pair's second model (``winner`` in the pair
``base~winner``): +1 it was better, 0 a tie, -1 it was worse. The judge gives an outcome on the same
prompt from its two scores (the sign of second minus first). Pure functions on plain lists and
dicts, so every figure can be checked against a hand-computed case.

MT-Bench (Zheng et al. 2023) is the reference: GPT-4 agreed with expert votes 66% of the time with
ties counted and 85% of the time without (two experts agreed with each other about as often).
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations

from orpolab.evaluate.stats import bootstrap_mean_ci, pairwise_preference

OUTCOMES = (-1, 0, 1)
# MT-Bench's agreement between GPT-4 and experts (its Table 2, setup S1 with ties, S2 without).
MT_BENCH = {"with_ties": 0.66, "without_ties": 0.85}


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def human_outcome(rating: dict, first: str, second: str) -> int | None:
    """+1 when the person preferred ``second``, -1 ``first``, 0 a tie; None for a skip."""
    choice = rating["choice"]
    if choice == "tie":
        return 0
    if choice not in ("A", "B"):
        return None
    preferred = rating["a"] if choice == "A" else rating["b"]
    if preferred not in (first, second):
        raise ValueError(f"rating names {preferred!r}, not a model of the pair {first}~{second}")
    return 1 if preferred == second else -1


def judge_outcome(first_score: float | None, second_score: float | None) -> int | None:
    """The judge's outcome from its two scores (None when either verdict is missing or unparsable)."""
    if first_score is None or second_score is None or first_score < 0 or second_score < 0:
        return None
    return sign(second_score - first_score)


def win_rate(outcomes: list[int], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Wins, ties, losses and the win rate P(win) + ½·P(tie) with a 95% percentile bootstrap interval.

    The same figure and interval as the judge's calibration (:func:`stats.pairwise_preference` with the
    outcome as the "chosen" score and 0 as the "rejected" one), so both read the same way.
    """
    out = {"wins": sum(o == 1 for o in outcomes), "ties": sum(o == 0 for o in outcomes),
           "losses": sum(o == -1 for o in outcomes), "n": len(outcomes)}
    if not outcomes:
        return {**out, "undefined": "no ratings"}
    p = pairwise_preference([float(o) for o in outcomes], [0.0] * len(outcomes), n_resamples, seed)
    return {**out, "value": p["value"], "ci_low": p["ci_low"], "ci_high": p["ci_high"]}


def cohen_kappa(x: list[int], y: list[int], categories: tuple = OUTCOMES) -> dict:
    """Cohen's kappa of two raters over the same items: (observed - chance agreement) / (1 - chance).

    Chance agreement is Σ_k p_x(k)·p_y(k) from each rater's own marginals. When both raters put every
    item in one category, chance agreement is 1 and kappa is undefined (said, not a number).
    """
    if len(x) != len(y):
        raise ValueError("kappa needs the two raters' outcomes on the same items")
    n = len(x)
    if n == 0:
        return {"n": 0, "undefined": "no common items"}
    observed = sum(a == b for a, b in zip(x, y, strict=True)) / n
    cx, cy = Counter(x), Counter(y)
    chance = sum(cx[k] * cy[k] for k in categories) / (n * n)
    out = {"n": n, "observed": observed, "chance": chance}
    if chance >= 1.0:
        return {**out, "undefined": "both raters gave one outcome only"}
    return {**out, "value": (observed - chance) / (1.0 - chance)}


def agreement(x: list[int], y: list[int]) -> dict:
    """How often two raters agree, MT-Bench's two ways, and Cohen's kappa over the three outcomes.

    ``with_ties``: share of items with the same outcome (a tie is an outcome). ``without_ties``: the
    same share over the items where neither rater called a tie (MT-Bench's setup S2).
    """
    kappa = cohen_kappa(x, y)
    both = [(a, b) for a, b in zip(x, y, strict=True) if a != 0 and b != 0]
    out = {"n": len(x), "kappa": kappa, "n_without_ties": len(both)}
    if x:
        out["with_ties"] = sum(a == b for a, b in zip(x, y, strict=True)) / len(x)
    if both:
        out["without_ties"] = sum(a == b for a, b in both) / len(both)
    return out


def position_bias(ratings: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """How often the person picked A among their A-or-B choices (about ½ for a person without position bias)."""
    picks = [1.0 if r["choice"] == "A" else 0.0 for r in ratings if r["choice"] in ("A", "B")]
    out = {"n": len(picks), "ties": sum(r["choice"] == "tie" for r in ratings)}
    if not picks:
        return {**out, "undefined": "no A or B choices"}
    lo, hi = bootstrap_mean_ci(picks, n_resamples, seed=seed)
    return {**out, "value": sum(picks) / len(picks), "ci_low": lo, "ci_high": hi}


def tag_counts(ratings: list[dict]) -> dict[str, dict[str, int]]:
    """Model -> tag -> how often the person gave that answer the tag."""
    counts: dict[str, Counter] = {}
    for r in ratings:
        for side, model in (("A", r["a"]), ("B", r["b"])):
            for tag in (r.get("tags") or {}).get(side, []):
                counts.setdefault(model, Counter())[tag] += 1
    return {m: dict(sorted(c.items())) for m, c in sorted(counts.items())}


def summarize(by_reviewer: dict[str, list[dict]], pairs: list[tuple[str, str]],
              judge_scores: dict[str, dict[int, float]], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Every figure of the report's Human review section, from each reviewer's ratings (one per item).

    ``pairs``: (first, second) models, id ``first~second``; ``judge_scores``: model -> prompt id ->
    the judge's score (negative: unparsable). The pooled rows count every reviewer's ratings; the judge
    is compared with each rating on a prompt it scored both answers of.
    """
    pair_of = {f"{a}~{b}": (a, b) for a, b in pairs}
    all_ratings = [r for rs in by_reviewer.values() for r in rs if r["pair"] in pair_of]
    out: dict = {"reviewers": {name: len([r for r in rs if r["choice"] != "skip"])
                               for name, rs in sorted(by_reviewer.items())},
                 "skipped": sum(r["choice"] == "skip" for r in all_ratings), "pairs": {}, "mt_bench": MT_BENCH}
    pooled_h, pooled_j = [], []
    for pid, (first, second) in pair_of.items():
        rated = [r for r in all_ratings if r["pair"] == pid and r["choice"] != "skip"]
        if not rated:
            continue
        human = [human_outcome(r, first, second) for r in rated]
        judged = [judge_outcome(judge_scores.get(first, {}).get(r["prompt"]),
                                judge_scores.get(second, {}).get(r["prompt"])) for r in rated]
        common = [(h, j) for h, j in zip(human, judged, strict=True) if j is not None]
        pooled_h += [h for h, _ in common]
        pooled_j += [j for _, j in common]
        out["pairs"][pid] = {"first": first, "second": second, "human": win_rate(human, n_resamples, seed),
                             "judge_vs_human": agreement([h for h, _ in common], [j for _, j in common])}
    out["judge_vs_human"] = agreement(pooled_h, pooled_j)
    kept = [r for r in all_ratings if r["choice"] != "skip"]
    out["position"] = position_bias(kept, n_resamples, seed)
    out["tags"] = tag_counts(kept)
    out["between_reviewers"] = between_reviewers(by_reviewer, pair_of)
    return out


def between_reviewers(by_reviewer: dict[str, list[dict]], pair_of: dict[str, tuple[str, str]]) -> dict:
    """Each two reviewers' agreement on the items both rated (skips left out)."""
    out = {}
    for x, y in combinations(sorted(by_reviewer), 2):
        rx = {(r["pair"], r["prompt"]): r for r in by_reviewer[x] if r["choice"] != "skip" and r["pair"] in pair_of}
        ry = {(r["pair"], r["prompt"]): r for r in by_reviewer[y] if r["choice"] != "skip" and r["pair"] in pair_of}
        common = sorted(set(rx) & set(ry), key=str)
        hx = [human_outcome(rx[k], *pair_of[k[0]]) for k in common]
        hy = [human_outcome(ry[k], *pair_of[k[0]]) for k in common]
        out[f"{x}~{y}"] = agreement(hx, hy)
    return out


def disagrees_beyond_chance(summary: dict) -> bool:
    """Whether the judge agrees with the people less often than chance would (kappa below 0)."""
    kappa = (summary.get("judge_vs_human") or {}).get("kappa") or {}
    return kappa.get("value") is not None and kappa["value"] < 0


def metrics(summary: dict) -> dict[str, float]:
    """The figures as MLflow metrics (``human/*``)."""
    out: dict[str, float] = {}
    for pid, p in summary.get("pairs", {}).items():
        key = pid.replace("~", "_vs_").replace("@", "_")
        h = p["human"]
        for name in ("wins", "ties", "losses"):
            out[f"human/{key}/{name}"] = h[name]
        if "value" in h:
            out.update({f"human/{key}/win_rate": h["value"], f"human/{key}/win_rate_ci_low": h["ci_low"],
                        f"human/{key}/win_rate_ci_high": h["ci_high"]})
    a = summary.get("judge_vs_human") or {}
    for name in ("with_ties", "without_ties"):
        if name in a:
            out[f"human/judge_agreement_{name}"] = a[name]
    if "value" in (a.get("kappa") or {}):
        out["human/judge_kappa"] = a["kappa"]["value"]
    if "value" in (summary.get("position") or {}):
        out["human/chose_A"] = summary["position"]["value"]
    out["human/ratings"] = float(sum(summary.get("reviewers", {}).values()))
    return out
