"""The final report: sweep table, training curves, export checks, judge and objective scores.

It writes what it is given (:class:`ReportInputs`, gathered by :mod:`orpolab.evaluate.stages.report`
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

from orpolab.evaluate import search_report
from orpolab.evaluate.report_human import human_cell, human_section, human_warnings
from orpolab.evaluate.report_results import (
    data_section,
    diff_cell,
    figure_name,
    headline,
    interval_cell,
    judge_section,
    length_section,
    quant_section,
    reuse_line,
    short_cell,
    warnings,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
          "train/rewards/accuracies")
SWEEP_PARAMS = ("model.name_or_path", "method.name", "method.beta", "optim.lr", "seed")
COLORS = ["#999999", "#2b7bba", "#e08a2c", "#4a9e5c", "#b55d9e", "#8c6d4f"]


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
    # The project folder the sweep ran in: data paths under it are shown relative to it, so a report
    # read on another machine names no folder of this one.
    project_root: Path | None = None
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


HELD_OUT = (("val/chosen_bpb", "held-out chosen bits/byte", "{:.4f}"),
            ("val/pref_accuracy", "held-out preference accuracy", "{:.3f}"))


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
            vs = "" if model == "base" else f" ({diff_cell(entry['paired'][model])})"
            cells.append(interval_cell(entry.get(model)) + vs)
        for f in figures:
            vs = "" if model == "base" else f" ({diff_cell(results['checks_paired'][f][model])})"
            cells.append(interval_cell(results["models"][model].get("checks", {}).get(f)) + vs)
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Held-out metrics are those of the exported (best) checkpoint, on the validation split; the job's "
           "last evaluation is shown beside where it differs. Intervals are 95% bootstrap intervals, differences "
           "are paired on the same prompts.", ""]
    return md


def write_report(r: ReportInputs, report_dir: Path) -> Path:
    """``report.md`` with its figures in ``report_dir``; returns the Markdown file."""
    results, models, trained, rows, exported = r.results, r.models, r.trained, r.jobs, r.exported
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(r, report_dir / "training_curves.png")
    plot_scores(results, models, report_dir / "scores.png")
    title = f"{r.sweep.name}, evaluation {r.evaluation_id}" if r.evaluation_id else r.sweep.name
    md = [f"# orpolab report: {title}", "",
          f"Sweep folder `{os.path.relpath(r.sweep, report_dir)}` (from this report's folder); MLflow parent run "
          f"`{r.parent_run_id}`.", "",
          *[f"{n}\n" for n in r.notes],
          *[f"{w}\n" for w in warnings(results)],
          *[f"{w}\n" for w in human_warnings(r.human)],
          "```", *headline(results, r.export), "```",
          "", *r.evaluations, "", f"Answers: {results['quant']} GGUFs of {', '.join(m for m in models if '@' not in m)}"
          + "".join(f", {m} at {m.partition('@')[2]}" for m in models if "@" in m) + " on the CPU, generation settings "
          f"`{json.dumps(results['generation'])}`; {results['prompts']} prompts, the judge scored the first "
          f"{results.get('judged_prompts', results['prompts'])}.", "", *reuse_line(results),
          *data_section(results, r.project_root),
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
            md.append(f"| {name} | {m} | {interval_cell(e.get(m))} | {interval_cell(e.get('base'))} | {diff_cell(p)} "
                      f"| {p['wins']} / {p['ties']} / {p['losses']} | {e['parse_failures']} |")
    for f in results.get("checks") or []:
        values = {m: results["models"][m].get("checks", {}).get(f) for m in models}
        md += ["", f"Checked by a program, **{figure_name(f)}**: " + ", ".join(
            f"{m} {interval_cell(a)}" for m, a in values.items() if a) + "."]
        for m, p in results.get("checks_paired", {}).get(f, {}).items():
            if "mean_diff" in p:
                md.append(f"- Paired on the same prompts, {m} - base: {diff_cell(p)} (95% bootstrap); {m} right and "
                          f"base wrong on {p['wins']} prompts, the reverse on {p['losses']}.")
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
            cells.append(f"{short_cell(answer, 60)} ({score}){mark}")
            if score is not None and score >= 0:
                ranked[m] = (bool(correct), score)
        top = max(ranked.values()) if ranked else None
        best = [m for m, v in ranked.items() if v == top]
        best_text = "-" if not best or len(best) == len(models) else ", ".join(best)
        human = f" {human_cell(r.human, prompt['id'])} |" if r.human else ""
        md.append(f"| {short_cell(prompt['prompt'], 60)} | " + " | ".join(cells) + f" | {best_text} |" + human)
    return md
