"""The report's Human review section: people's blind ratings (:mod:`orpolab.evaluate.review`) beside the judge.

Written from what :func:`orpolab.evaluate.review.fold.gather` computed; empty when nobody has rated.
"""

from __future__ import annotations

from orpolab.evaluate.report_results import short_cell
from orpolab.evaluate.stats import figure_text


def _share(value: float | None, n: int) -> str:
    return "-" if value is None else f"{value:.0%} of {n}"


def _kappa(k: dict) -> str:
    if "value" not in k:
        return f"undefined ({k.get('undefined', 'no items')})"
    return f"{k['value']:.3f} (observed {k['observed']:.3f}, chance {k['chance']:.3f})"


def human_warnings(h: dict) -> list[str]:
    """A line for the report's first lines when the judge disagrees with the people more often than chance."""
    from orpolab.evaluate.human import disagrees_beyond_chance

    if not h or not disagrees_beyond_chance(h):
        return []
    a = h["judge_vs_human"]
    return [f"**The judge disagrees with the human reviewers more often than chance**: Cohen's kappa "
            f"{a['kappa']['value']:.3f} on {a['n']} prompts both rated (agreement {a['with_ties']:.0%} with ties; "
            f"MT-Bench's GPT-4 agreed with experts {h['mt_bench']['with_ties']:.0%}). See Human review below."]


def human_section(h: dict) -> list[str]:
    """Win/tie/loss per pair as people rated it, the judge's agreement with them, their position bias and tags."""
    if not h:
        return []
    from orpolab.evaluate.review.ratings import TAGS

    reviewers = ", ".join(f"{name} ({n})" for name, n in h["reviewers"].items())
    md = ["## Human review", "",
          f"Blind side-by-side ratings (`python -m orpolab.evaluate.review <sweep> <evaluation id>`) by {reviewers}; "
          f"{h['skipped']} skipped. Each prompt showed two models' answers as A and B in an order drawn per prompt "
          "and recorded, the names hidden until the reviewer had finished. The win rate is P(second better) + "
          "½·P(tie), with a 95% bootstrap interval; the judge's outcome on a prompt is the sign of its score "
          "difference (second - first), compared with each rating of a prompt it scored both answers of.", "",
          "| pair (first vs second) | wins / ties / losses of second | win rate of second [95% CI] | "
          "judge agrees, with ties | judge agrees, without ties | Cohen's kappa (3 outcomes) |",
          "|---|---|---|---|---|---|"]
    for p in h["pairs"].values():
        w, a = p["human"], p["judge_vs_human"]
        md.append(f"| {p['first']} vs {p['second']} | {w['wins']} / {w['ties']} / {w['losses']} | {figure_text(w)} | "
                  f"{_share(a.get('with_ties'), a['n'])} | {_share(a.get('without_ties'), a['n_without_ties'])} | "
                  f"{_kappa(a['kappa'])} |")
    a = h["judge_vs_human"]
    md.append(f"| all pairs | | | {_share(a.get('with_ties'), a['n'])} | "
              f"{_share(a.get('without_ties'), a['n_without_ties'])} | {_kappa(a['kappa'])} |")
    ref = h["mt_bench"]
    md += ["", f"For comparison, MT-Bench's GPT-4 judge agreed with expert votes {ref['with_ties']:.0%} of the time "
           f"with ties and {ref['without_ties']:.0%} without, about as often as two experts agreed with each other. "
           "Kappa is 0 for a judge that agrees only as often as chance (from each rater's own share of outcomes), "
           "below 0 for one that disagrees more often.", ""]
    pos = h["position"]
    if "value" in pos:
        md.append(f"Position: the reviewers chose A in {round(pos['value'] * pos['n'])} of {pos['n']} A-or-B choices, "
                  f"{figure_text(pos)} (about ½ without position bias); {pos['ties']} ties.")
    if h["tags"]:
        md += ["", "Tags the reviewers gave each model's answers:", "",
               "| model | " + " | ".join(TAGS.values()) + " |", "|---|" + "---|" * len(TAGS)]
        for model, counts in h["tags"].items():
            md.append(f"| {model} | " + " | ".join(str(counts.get(t, 0)) for t in TAGS) + " |")
    if h.get("between_reviewers"):
        md += ["", "Reviewers against each other, on the items both rated:", "",
               "| reviewers | items | agree, with ties | agree, without ties | Cohen's kappa |",
               "|---|---|---|---|---|"]
        for names, b in h["between_reviewers"].items():
            md.append(f"| {names.replace('~', ' and ')} | {b['n']} | {_share(b.get('with_ties'), b['n'])} | "
                      f"{_share(b.get('without_ties'), b['n_without_ties'])} | {_kappa(b['kappa'])} |")
    return md + [""]


def human_cell(h: dict, prompt_id: int) -> str:
    """Each reviewer's verdict on a prompt, and their note: ``alice: winner > base (does not stop)``."""
    parts = []
    for v in h.get("per_prompt", {}).get(prompt_id, []):
        first, _, second = v["pair"].partition("~")
        verdict = f"{first} = {second}" if v["preferred"] == "tie" else \
            f"{v['preferred']} > {second if v['preferred'] == first else first}"
        parts.append(f"{v['reviewer']}: {verdict}" + (f" ({short_cell(v['note'], 60)})" if v["note"] else ""))
    return "; ".join(parts) or "-"
