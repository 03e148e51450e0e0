"""The final report: sweep table, training curves, export checks, judge and objective scores.

It writes what it is given (:class:`ReportInputs`, gathered by :mod:`orpolab.evaluate.pipeline`
from MLflow and the files the earlier stages wrote), so the report can be rebuilt at any time
(``python -m orpolab.evaluate <sweep> --stage report``) and is tested without a sweep.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from orpolab.core import console
from orpolab.evaluate import search_report
from orpolab.evaluate.stats import figure_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
          "train/rewards/accuracies")
SWEEP_PARAMS = ("model.name_or_path", "method.name", "method.beta", "optim.lr", "seed")
COLORS = ["#999999", "#2b7bba", "#e08a2c", "#4a9e5c", "#b55d9e", "#8c6d4f"]


def _interval(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['mean']:.3f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"


def _diff(p: dict) -> str:
    return f"{p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if "mean_diff" in p else "-"


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class ReportInputs:
    """Everything the report shows, already read from MLflow and the stages' files.

    ``jobs``: one row per sweep job (``job``, ``run_id``, ``status``, ``metric``, ``value``, ``method``,
    ``exported``, ``metrics`` and the :data:`SWEEP_PARAMS`); ``curves``: run id -> metric -> ``[(step,
    value)]``; ``answers`` / ``scores``: model -> prompt id -> answer record / first metric's score;
    ``checked``: model -> prompt id -> whether the checker accepted the answer (prompts it can check).
    """

    sweep: Path
    parent_run_id: str
    export: dict
    results: dict
    models: tuple[str, ...]
    prompts: list[dict]
    jobs: list[dict] = field(default_factory=list)
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    answers: dict[str, dict[int, dict]] = field(default_factory=dict)
    scores: dict[str, dict[int, int]] = field(default_factory=dict)
    checked: dict[str, dict[int, dict[str, bool]]] = field(default_factory=dict)
    # Which evaluation of the sweep this is, lines to read first about where it was recorded (MLflow or
    # only here), and the list of the sweep's evaluations (orpolab.evaluate.evaluations.section).
    evaluation_id: str = ""
    notes: list[str] = field(default_factory=list)
    evaluations: list[str] = field(default_factory=list)
    # People's blind ratings of this evaluation (orpolab.evaluate.review.fold.gather); empty when none.
    human: dict = field(default_factory=dict)

    @property
    def trained(self) -> tuple[str, ...]:
        """The exported models compared with the base (not the winner's other quantizations)."""
        return tuple(self.results.get("trained") or [m for m in self.models if m != "base"])

    def trained_models(self) -> tuple[str, ...]:
        """The base, then the exported models: the rows of the method comparison."""
        return ("base", *self.trained)

    @property
    def exported(self) -> dict[str, dict]:
        """Label -> exported model (older exports hold only "winner")."""
        return self.export.get("winners") or {"winner": self.export["winner"]}


def plot_curves(r: ReportInputs, path: Path) -> None:
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for row in r.jobs:
        label = f"job {row['job']} {row['method']}" + (f" ({row['exported']})" if row["exported"] else "")
        for ax, key in zip(axes, CURVES, strict=True):
            hist = r.curves.get(row["run_id"], {}).get(key)
            if hist:
                ax.plot([s for s, _ in hist], [v for _, v in hist], label=label,
                        linewidth=2.2 if row["exported"] else 1.0)
    for ax, key in zip(axes, CURVES, strict=True):
        ax.set_title(key.removeprefix("train/"))
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(results: dict, models: tuple[str, ...], path: Path) -> None:
    """Mean judge score and objective accuracy of every model, with bootstrap intervals."""
    panels = [(f"judge: {name}", entry) for name, entry in results["metrics"].items()]
    for f in results.get("checks") or []:
        panels.append((f"checked: {figure_name(f).split(' (')[0]}",
                       {m: results["models"][m].get("checks", {}).get(f) for m in models}))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(max(4.5, 1.2 * len(models) + 2) * max(1, len(panels)),
                                                              3.2), squeeze=False)
    for ax, (title, entry) in zip(axes[0], panels, strict=False):
        names = [m for m in models if entry.get(m)]
        means = [entry[m]["mean"] for m in names]
        err = [[entry[m]["mean"] - entry[m]["ci_low"] for m in names], [entry[m]["ci_high"] - entry[m]["mean"]
                                                                         for m in names]]
        ax.bar(names, means, yerr=err, capsize=6, color=[COLORS[models.index(m) % len(COLORS)] for m in names])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_spread(rows: list[dict]) -> list[str]:
    """Mean and spread of the selection value for configs that ran with several seeds."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["value"] is not None:
            groups[tuple(r[p] for p in SWEEP_PARAMS if p != "seed")].append(r["value"])
    lines = []
    for key, values in groups.items():
        if len(values) > 1:
            lines.append(f"- {', '.join(key)}: mean {statistics.mean(values):.4f}, sd {statistics.stdev(values):.4f} "
                         f"over {len(values)} seeds")
    return lines


FIGURE_NAMES = {"value_right": "value right", "exact": "exact (value right, ended, no repetition)"}
HELD_OUT = (("val/chosen_bpb", "held-out chosen bits/byte", "{:.4f}"),
            ("val/pref_accuracy", "held-out preference accuracy", "{:.3f}"))


def figure_name(fig: str) -> str:
    return FIGURE_NAMES.get(fig, fig.replace("_", " "))


def held_out_cell(job: dict, key: str, fmt: str) -> str:
    """The exported (best) checkpoint's held-out value, and the job's last evaluation beside it when it differs."""
    metrics = job.get("metrics", {})
    best, last = metrics.get(f"best/{key}"), metrics.get(key)
    if best is None:
        return fmt.format(last) + " (last evaluation)" if last is not None else "-"
    text = fmt.format(best)
    if last is not None and fmt.format(last) != text:
        text += f" (last: {fmt.format(last)})"
    return text


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


def method_comparison(r: ReportInputs) -> list[str]:
    """Per method: how its model was picked, its held-out metrics, and its scores against the base."""
    results, exported = r.results, r.exported
    figures = results.get("checks") or []
    by_run = {j["run_id"]: j for j in r.jobs}
    md = ["## Method comparison", "",
          "Each method's best job was picked by the selection metric named in the table. That metric is "
          "comparable across methods but favours some by construction (SFT minimises exactly the chosen "
          "answers' NLL, which bits per byte measures), so the methods are compared on the answers below, "
          "not by it.", "",
          "| model | method | job | picked by | " + " | ".join(h for _, h, _ in HELD_OUT) + " | "
          + " | ".join(f"{name} (vs base)" for name in results["metrics"])
          + "".join(f" | {figure_name(f)} (vs base)" for f in figures) + " |",
          "|---|---|---|---|---|---|" + "---|" * (len(results["metrics"]) + len(figures))]
    for model in r.trained_models():
        if model == "base":
            cells = ["base", "-", "-", "-", "-", "-"]
        else:
            e = exported[model]
            job = by_run.get(e["run_id"], {"metrics": {}})
            cells = [model, e.get("method", "orpo"), str(e["job"]), f"{e.get('metric', '')} = {e['value']:.4f}",
                     *(held_out_cell(job, key, fmt) for key, _, fmt in HELD_OUT)]
        for entry in results["metrics"].values():
            vs = "" if model == "base" else f" ({_diff(entry['paired'][model])})"
            cells.append(_interval(entry.get(model)) + vs)
        for f in figures:
            vs = "" if model == "base" else f" ({_diff(results['checks_paired'][f][model])})"
            cells.append(_interval(results["models"][model].get("checks", {}).get(f)) + vs)
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Held-out metrics are those of the exported (best) checkpoint, on the validation split; the job's "
           "last evaluation is shown beside where it differs. Intervals are 95% bootstrap intervals, differences "
           "are paired on the same prompts.", ""]
    return md


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
                lines.append(f"  {figure_name(f).split(' (')[0]:<13}  base {_interval(base_f)}  {m} {_interval(mine)}  "
                             f"paired difference {_diff(paired)}")
        for name, entry in results["metrics"].items():
            p = entry["paired"].get(m, {})
            note = ("  (stand-in judge)" if results.get("stand_in") else "") + (
                "  (judge no better than chance: uninformative)" if uninformative else "")
            label = name.removeprefix("RESPONSE_").lower().replace("_", ", ")
            judged = results.get("judged_prompts", results["prompts"])
            if judged < results["prompts"]:
                label += f"; first {judged} prompts"
            lines.append(f"  judge ({label})  base {_interval(entry.get('base'))}  "
                         f"{m} {_interval(entry.get(m))}  paired difference {_diff(p)}, "
                         f"wins/ties/losses {p.get('wins', 0)}/{p.get('ties', 0)}/{p.get('losses', 0)}{note}")
        ends = {k: results["models"][k]["ended_by_eos"] for k in ("base", m)}
        lines.append(f"  answers that end by themselves  base {ends['base']:.0%}  {m} {ends[m]:.0%}")
    return lines


def data_section(results: dict) -> list[str]:
    """Which split each figure comes from, with its size."""
    s = results.get("splits")
    if not s:
        return []
    md = ["## Data", "", "| split | rows | source | used for |", "|---|---|---|---|"]
    for name in ("train", "validation", "test"):
        md.append(f"| {name} | {s[name]['rows']} | {_short(s[name]['source'], 90)} | {s[name]['used_for']} |")
    ev = s["evaluation_prompts"]
    md += ["", f"Evaluation prompts: {ev['n']} from {ev['source']} ({ev['kind']}); identical prompts found in "
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
            cells.append(("-" if f not in row else f"{row[f]:.3f}") + (f" ({_diff(vs)})" if vs else ""))
        for n in metrics:
            vs = row.get(f"judge_{n}_vs_{ref}")
            value = row.get(f"judge_{n}")
            cells.append(("-" if value is None else f"{value:.3f}") + (f" ({_diff(vs)})" if vs else ""))
        md.append("| " + " | ".join(cells) + " |")
    return md + [""]


def write_report(r: ReportInputs, report_dir: Path) -> Path:
    """``report.md`` with its figures in ``report_dir``; returns the Markdown file."""
    results, models, trained, rows, exported = r.results, r.models, r.trained, r.jobs, r.exported
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(r, report_dir / "training_curves.png")
    plot_scores(results, models, report_dir / "scores.png")
    title = f"{r.sweep.name}, evaluation {r.evaluation_id}" if r.evaluation_id else r.sweep.name
    md = [f"# orpolab report: {title}", "",
          f"Sweep folder `{r.sweep}`; MLflow parent run `{r.parent_run_id}`.", "",
          *[f"{n}\n" for n in r.notes],
          *[f"{w}\n" for w in warnings(results)],
          *[f"{w}\n" for w in human_warnings(r.human)],
          "```", *headline(results, r.export), "```",
          "", *r.evaluations, "", f"Answers: {results['quant']} GGUFs of {', '.join(m for m in models if '@' not in m)}"
          + "".join(f", {m} at {m.partition('@')[2]}" for m in models if "@" in m) + " on the CPU, generation settings "
          f"`{json.dumps(results['generation'])}`; {results['prompts']} prompts, the judge scored the first "
          f"{results.get('judged_prompts', results['prompts'])}.", "",
          *data_section(results),
          "## Sweep", "", f"Selection metric: `{rows[0]['metric'] if rows else ''}` on the validation split (exported "
          "jobs are marked" + ("; one per method" if len(r.exported) > 1 else "") + ").", "",
          "| job | method | model | beta | lr | seed | status | selection value | "
          "held-out preference accuracy (best checkpoint) | exported |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for j in rows:
        value = f"{j['value']:.4f}" if j["value"] is not None else "-"
        mark = f"**{j['exported']}**" if j["exported"] else ""
        md.append(f"| {j['job']} | {j['method']} | {Path(j['model.name_or_path']).name} | {j['method.beta']} | "
                  f"{j['optim.lr']} | {j['seed']} | {j['status']} | {value} | "
                  f"{held_out_cell(j, 'val/pref_accuracy', '{:.3f}')} | {mark} |")
    md += ["", *seed_spread(rows), ""]
    md += search_report.section(r.sweep, report_dir)  # a hyperparameter search's own section (none for a grid)
    md += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    if len(r.exported) > 1:
        md += method_comparison(r)
    md += ["## Export verification", ""]
    for label, e in exported.items():
        md.append(f"- {label}: job {e['job']} ({e['overrides']}), merged model `{e.get('merged_model', '')}`.")
    md += ["", "On validation conversations (never training rows).", "",
           "| model | GGUF | token ids | ppl GGUF | ppl PyTorch | ratio (max) | top-1 agreement (min) | |",
           "|---|---|---|---|---|---|---|---|"]
    for c in r.export["verification"]:
        md.append(f"| {c.get('model', 'winner')} | {Path(c['gguf']).name} | "
                  f"{'identical' if not c['token_id_mismatches'] else 'differ'} | "
                  f"{c['ppl_gguf']:.3f} | {c['ppl_pytorch']:.3f} | {c['ppl_ratio']:.3f} ({c['max_ppl_ratio']}) | "
                  f"{c['top1_agreement']:.3f} ({c['min_top1_agreement']}) | {'ok' if c['passed'] else 'FAILED'} |")
    md += ["", *judge_section(results), "## Scores", "", "![scores](scores.png)", "",
           "| metric | model | score [95% CI] | base | model - base [95% CI] | wins / ties / losses | parse failures |",
           "|---|---|---|---|---|---|---|"]
    for name, e in results["metrics"].items():
        for m in trained:
            p = e["paired"][m]
            md.append(f"| {name} | {m} | {_interval(e.get(m))} | {_interval(e.get('base'))} | {_diff(p)} "
                      f"| {p['wins']} / {p['ties']} / {p['losses']} | {e['parse_failures']} |")
    for f in results.get("checks") or []:
        values = {m: results["models"][m].get("checks", {}).get(f) for m in models}
        md += ["", f"Checked by a program, **{figure_name(f)}**: " + ", ".join(
            f"{m} {_interval(a)}" for m, a in values.items() if a) + "."]
        for m, p in results.get("checks_paired", {}).get(f, {}).items():
            if "mean_diff" in p:
                md.append(f"- Paired on the same prompts, {m} - base: {_diff(p)} (95% bootstrap); {m} right and base "
                          f"wrong on {p['wins']} prompts, the reverse on {p['losses']}.")
    md += ["", *human_section(r.human), *quant_section(results), *length_section(results, models, trained),
           "## Per prompt", "", *per_prompt_table(r)]
    out = report_dir / "report.md"
    tmp = report_dir / ".report.md.tmp"
    tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def per_prompt_table(r: ReportInputs) -> list[str]:
    """One row per prompt, one column per model (answer, judge score, checked result), the best marked."""
    models = r.models
    first_metric = next(iter(r.results["metrics"]), None)
    figures = r.results.get("checks") or []
    last = figures[-1] if figures else None
    md = [f"Each cell: the answer, then the judge's {first_metric} score"
          + (f" and ✓ / ✗ for {figure_name(last)}" if last else "")
          + ". **best**: the models with the top judge score (checked answers first, when the prompt has one).", "",
          "| prompt | " + " | ".join(models) + " | best |" + (" human |" if r.human else ""),
          "|---" * (len(models) + 2 + bool(r.human)) + "|"]
    for prompt in r.prompts:
        cells, ranked = [], {}
        for m in models:
            answer = r.answers.get(m, {}).get(prompt["id"], {}).get("answer", "")
            score = r.scores.get(m, {}).get(prompt["id"])
            check = r.checked.get(m, {}).get(prompt["id"])
            correct = check.get(last) if check and last else None
            mark = "" if correct is None else (" ✓" if correct else " ✗")
            cells.append(f"{_short(answer, 60)} ({score}){mark}")
            if score is not None and score >= 0:
                ranked[m] = (bool(correct), score)
        top = max(ranked.values()) if ranked else None
        best = [m for m, v in ranked.items() if v == top]
        best_text = "-" if not best or len(best) == len(models) else ", ".join(best)
        human = f" {human_cell(r.human, prompt['id'])} |" if r.human else ""
        md.append(f"| {_short(prompt['prompt'], 60)} | " + " | ".join(cells) + f" | {best_text} |" + human)
    return md


# ------------------------------------------------------------------ people's blind ratings


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
        parts.append(f"{v['reviewer']}: {verdict}" + (f" ({_short(v['note'], 60)})" if v["note"] else ""))
    return "; ".join(parts) or "-"

