"""The report's text that comes from ``results.json`` alone: the warnings read first, the headline, and
the data, judge, length and quantization sections.

The console prints the same headline (:func:`headline`) after the report stage, so both say the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orpolab.core import console
from orpolab.evaluate.stats import figure_text


def interval_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['mean']:.3f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"


def diff_cell(p: dict) -> str:
    return f"{p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if "mean_diff" in p else "-"


def short_cell(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


FIGURE_NAMES = {"value_right": "value right", "exact": "exact (value right, ended, no repetition)"}
def figure_name(fig: str) -> str:
    return FIGURE_NAMES.get(fig, fig.replace("_", " "))


def judge_trust(results: dict) -> tuple[str, bool]:
    """(a sentence on how far the judge's scores can be trusted, whether they are uninformative)."""
    cal = results.get("calibration")
    if cal is None:
        return ("**The judge's calibration has not run** (`python -m orpolab.evaluate <sweep> --stage calibrate`): "
                "its scores carry no measured reliability.", False)
    if not cal.get("enabled"):
        return ("**The judge is unmeasured** (calibration off: evaluation.judge.calibration_size=0): its scores "
                "carry no measured reliability.", False)
    sentences, uninformative = [], False
    for name, c in (cal.get("metrics") or {}).items():
        parts = []
        if c.get("pairwise"):
            parts.append(f"P(chosen scored higher) + ½·P(tie) = {figure_text(c['pairwise'])} on "
                         f"{c['pairwise'].get('n', 0)} test-split pairs (chance 0.5; ties "
                         f"{c['pairwise'].get('p_tie', 0):.0%})")
        if c.get("auc"):
            parts.append(f"AUC against checked correctness {figure_text(c['auc'])} on {c['auc'].get('n', 0)} "
                         "answers built right and wrong")
        bad = c.get("verdict") in ("no better than chance", "unmeasured")
        uninformative |= bad
        sentences.append(f"{name}: " + "; ".join(parts) + (
            f" — **{c.get('verdict')}: its scores below are uninformative.**" if bad else "."))
    return "Judge calibration (95% intervals): " + " ".join(sentences), uninformative


def warnings(results: dict) -> list[str]:
    """What the reader must know before any figure: stand-in judge, an unreliable judge, self-preference, leaks."""
    lines = []
    trust, _ = judge_trust(results)
    lines.append(trust)
    if results.get("stand_in"):
        lines.append("**Stand-in judge**: a small local model stands in for Flow Judge (offline); its scores are not "
                     "Flow Judge's.")
    sp = results.get("self_preference") or {}
    if sp.get("same"):
        lines.append(f"**Self-preference warning**: the judge and the evaluated models are of the same family "
                     f"(`{sp['model_family']}`); judges tend to favour text of their own lineage.")
    ev = (results.get("splits") or {}).get("evaluation_prompts") or {}
    if ev.get("in_train") or ev.get("in_validation"):
        lines.append(f"**Leak**: {ev.get('in_train', 0)} evaluation prompts also appear in the training data and "
                     f"{ev.get('in_validation', 0)} in the validation data (identical prompts).")
    return lines


def headline(results: dict, export: dict) -> list[str]:
    """The result in a few lines: each trained model against its base, with 95% intervals.

    What the sweep was for, read from ``results.json`` (the score stage) and ``export.json``; the
    console ends with it and the report opens with it.
    """
    exported = export.get("winners") or {"winner": export["winner"]}
    trained = results.get("trained") or [m for m in results.get("models_order") or ["base", *exported]
                                         if m != "base"]
    _, uninformative = judge_trust(results)
    lines = []
    for m in trained:
        e = exported.get(m, {})
        lines.append(f"Result: {m} = job {e.get('job', '?')} ({console.brief_overrides(e.get('overrides', ''))}), "
                     f"{e.get('metric', '')} {e.get('value', float('nan')):.4f}; against its base on "
                     f"{results['prompts']} prompts ({results['quant']} GGUFs), 95% intervals:")
        for f in results.get("checks") or []:
            base_f = results["models"]["base"].get("checks", {}).get(f)
            mine = results["models"][m].get("checks", {}).get(f)
            paired = results.get("checks_paired", {}).get(f, {}).get(m, {})
            if base_f and mine:
                lines.append(f"  {figure_name(f).split(' (')[0]:<13}  base {interval_cell(base_f)}  "
                             f"{m} {interval_cell(mine)}  "
                             f"paired difference {diff_cell(paired)}")
        for name, entry in results["metrics"].items():
            p = entry["paired"].get(m, {})
            note = ("  (stand-in judge)" if results.get("stand_in") else "") + (
                "  (judge no better than chance: uninformative)" if uninformative else "")
            label = name.removeprefix("RESPONSE_").lower().replace("_", ", ")
            judged = results.get("judged_prompts", results["prompts"])
            if judged < results["prompts"]:
                label += f"; first {judged} prompts"
            lines.append(f"  judge ({label})  base {interval_cell(entry.get('base'))}  "
                         f"{m} {interval_cell(entry.get(m))}  paired difference {diff_cell(p)}, "
                         f"wins/ties/losses {p.get('wins', 0)}/{p.get('ties', 0)}/{p.get('losses', 0)}{note}")
        ends = {k: results["models"][k]["ended_by_eos"] for k in ("base", m)}
        lines.append(f"  answers that end by themselves  base {ends['base']:.0%}  {m} {ends[m]:.0%}")
    return lines


def reuse_line(results: dict) -> list[str]:
    """How much of the work was taken from the stores (answers and verdicts made before) and the time saved."""
    reuse = results.get("reuse") or {}
    parts = [f"{stage}: {c['reused']} taken from the store, {c['made']} made anew"
             for stage, c in reuse.items() if c.get("reused") or c.get("made")]
    if not parts:
        return []
    minutes = sum(c.get("seconds_saved", 0.0) for c in reuse.values()) / 60
    return [f"Work reused (same model or judge file, prompt and settings; `evaluation.reuse`): {'; '.join(parts)}; "
            f"about {minutes:.1f} min saved at the rates measured when it was made.", ""]


def project_relative(text: str, root: Path | None) -> str:
    """``text`` with the project folder's absolute path taken out of the paths it names."""
    return text.replace(f"{root}{os.sep}", "") if root else text


def data_section(results: dict, root: Path | None = None) -> list[str]:
    """Which split each figure comes from, with its size (paths relative to the project folder ``root``)."""
    s = results.get("splits")
    if not s:
        return []
    md = ["## Data", "", "| split | rows | source | used for |", "|---|---|---|---|"]
    for name in ("train", "validation", "test"):
        source = short_cell(project_relative(s[name]["source"], root), 90)
        md.append(f"| {name} | {s[name]['rows']} | {source} | {s[name]['used_for']} |")
    ev = s["evaluation_prompts"]
    source = project_relative(ev["source"], root)
    md += ["", f"Evaluation prompts: {ev['n']} from {source} ({ev['kind']}); identical prompts found in "
           f"training: {ev['in_train']}, in validation: {ev['in_validation']}. The answers, the judge's scores and "
           "every comparison below are on these prompts; held-out bits/byte and preference accuracy are on the "
           "validation split, which also selected the checkpoints and the winner.", ""]
    return md


def judge_section(results: dict) -> list[str]:
    """The judge's identity and calibration."""
    md = ["## Judge", "", f"{results['judge']}.", ""]
    for name, ident in (results.get("judge_identity") or {}).items():
        md.append(f"- {name}: file `{ident['file']}` (sha256 {ident['sha256']}), quantization {ident['quant']}, "
                  f"family `{ident.get('family')}`; grammar {ident['grammar']} (sha256 {ident['grammar_sha256']}); "
                  f"sampling {json.dumps(ident['sampling'])}; prompt template sha256 "
                  f"{ident['prompt_template_sha256']}.")
    trust, _ = judge_trust(results)
    md += ["", trust, "",
           "Calibration never grades an answer against itself: preference pairs are scored with a reference-free "
           "variant of the metric (the same rubric, only the question), checked answers against the correct value.",
           ""]
    return md


def length_section(results: dict, models: tuple[str, ...], trained: tuple[str, ...]) -> list[str]:
    md = ["## How the answers end, and their length", "",
          "| model | ended by itself | hit the token budget | mean tokens | repeated 3-grams | skipped |",
          "|---|---|---|---|---|---|"]
    budget = results.get("generation", {}).get("max_tokens")
    for m in models:
        s = results["models"][m]
        md.append(f"| {m} | {s['ended_by_eos']:.0%} | {s.get('hit_budget', '-')} of {s['answered']} | "
                  f"{s['mean_tokens']:.1f} | {s['mean_repeated_3gram_fraction']:.3f} | {s['skipped']} |")
    md += ["", f"Token budget: {budget} tokens per answer.", "",
           "Length sensitivity (a sensitivity figure, not AlpacaEval's length-controlled win rate): per prompt, "
           "the judge-score difference (model - base) regressed by least squares on the answer-length difference "
           "in tokens; the intercept is the difference at equal length, the slope what each extra token is worth "
           "to the judge (95% paired-bootstrap intervals).", ""]
    for name, entry in results["metrics"].items():
        for m in trained:
            reg = (entry.get("length") or {}).get(m) or {}
            if "slope" not in reg:
                md.append(f"- {name}, {m}: not computed ({reg.get('undefined', 'no scored pairs')}).")
                continue
            md.append(f"- {name}, {m}: intercept {figure_text(reg, 'intercept')}, slope "
                      f"{figure_text(reg, 'slope', 4)} per token; n = {reg['n']}, length differences from "
                      f"{reg['length_diff_min']:+.0f} to {reg['length_diff_max']:+.0f} tokens (central 90%: "
                      f"{reg['length_diff_p5']:+.0f} to {reg['length_diff_p95']:+.0f}).")
            if reg.get("zero_outside_central_90"):
                md.append("  **Warning**: equal length lies outside the central 90% of the length differences, so the "
                          "intercept extrapolates; do not read it as the difference at equal length.")
    return md + [""]


def quant_section(results: dict) -> list[str]:
    qc = results.get("quant_costs")
    if not qc:
        return []
    ref = qc["reference"]
    figures = results.get("checks") or []
    metrics = list(results["metrics"])
    md = ["## What quantization costs", "",
          f"The winner answered and judged at each quantization, on the same prompts; differences are paired "
          f"against {ref} (95% bootstrap intervals).", "",
          "| quantization | " + " | ".join(f"{figure_name(f).split(' (')[0]} (vs {ref})" for f in figures)
          + "".join(f" | judge {n} (vs {ref})" for n in metrics) + " |",
          "|---|" + "---|" * (len(figures) + len(metrics))]
    for q, row in qc["rows"].items():
        cells = [q]
        for f in figures:
            vs = row.get(f"{f}_vs_{ref}")
            cells.append(("-" if f not in row else f"{row[f]:.3f}") + (f" ({diff_cell(vs)})" if vs else ""))
        for n in metrics:
            vs = row.get(f"judge_{n}_vs_{ref}")
            value = row.get(f"judge_{n}")
            cells.append(("-" if value is None else f"{value:.3f}") + (f" ({diff_cell(vs)})" if vs else ""))
        md.append("| " + " | ".join(cells) + " |")
    return md + [""]
