"""The reviewers' ratings folded into the report: read at each report, so new ratings need no new judging."""

from __future__ import annotations

from pathlib import Path

from orpolab.evaluate import human
from orpolab.evaluate.review.ratings import read_all
from orpolab.evaluate.review.source import pairs_of


def gather(folder: Path, models: tuple[str, ...] | list[str], judge_scores: dict[str, dict[int, float]],
           n_resamples: int = 1000, seed: int = 0) -> dict:
    """The Human review figures of an evaluation (:func:`human.summarize`) and each prompt's verdicts.

    Empty when nobody has rated yet. ``judge_scores``: model -> prompt id -> the judge's score on the
    first metric (the one the report's per-prompt table shows).
    """
    by_reviewer = {name: rs for name, rs in read_all(folder).items() if rs}
    if not by_reviewer:
        return {}
    pairs = pairs_of(list(models))
    out = human.summarize(by_reviewer, pairs, judge_scores, n_resamples, seed)
    per_prompt: dict[int, list[dict]] = {}
    for name, rs in sorted(by_reviewer.items()):
        for r in rs:
            if r["choice"] == "skip":
                continue
            preferred = {"A": r["a"], "B": r["b"]}.get(r["choice"], "tie")
            per_prompt.setdefault(r["prompt"], []).append(
                {"reviewer": name, "pair": r["pair"], "preferred": preferred, "note": r.get("note", "")})
    out["per_prompt"] = per_prompt
    return out
