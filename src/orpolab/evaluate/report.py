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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
          "train/rewards/accuracies")
SWEEP_PARAMS = ("model.name_or_path", "method.name", "method.beta", "optim.lr", "seed")
STAND_IN_NOTE = " This report was scored by a stand-in, not by Flow Judge: its judge scores say nothing about quality."
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
    checked: dict[str, dict[int, bool]] = field(default_factory=dict)

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(m for m in self.models if m != "base")

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
    if any("accuracy" in results["models"][m] for m in models):
        panels.append(("exact-answer accuracy", {m: results["models"][m].get("accuracy") for m in models}))
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


def method_comparison(r: ReportInputs) -> list[str]:
    """Per method: how its model was picked, its held-out metrics, and its scores against the base."""
    results, exported = r.results, r.exported
    by_run = {j["run_id"]: j for j in r.jobs}
    md = ["## Method comparison", "",
          "Each method's best job was picked by the selection metric named in the table. That metric is "
          "comparable across methods but favours some by construction (SFT minimises exactly the chosen "
          "answers' NLL, which bits per byte measures), so the methods are compared on the answers below, "
          "not by it.", "",
          "| model | method | job | picked by | held-out chosen bits/byte | held-out preference accuracy | "
          + " | ".join(f"{name} (vs base)" for name in results["metrics"])
          + (" | exact-answer accuracy (vs base) |" if "accuracy_paired" in results else " |"),
          "|---|---|---|---|---|---|" + "---|" * len(results["metrics"])
          + ("---|" if "accuracy_paired" in results else "")]
    for model in r.models:
        if model == "base":
            cells = ["base", "-", "-", "-", "-", "-"]
        else:
            e = exported[model]
            job = by_run.get(e["run_id"], {"metrics": {}})
            bpb, acc = job["metrics"].get("val/chosen_bpb"), job["metrics"].get("val/pref_accuracy")
            cells = [model, e.get("method", "orpo"), str(e["job"]), f"{e.get('metric', '')} = {e['value']:.4f}",
                     f"{bpb:.4f}" if bpb is not None else "-", f"{acc:.3f}" if acc is not None else "-"]
        for entry in results["metrics"].values():
            vs = "" if model == "base" else f" ({_diff(entry['paired'][model])})"
            cells.append(_interval(entry.get(model)) + vs)
        if "accuracy_paired" in results:
            vs = "" if model == "base" else f" ({_diff(results['accuracy_paired'][model])})"
            cells.append(_interval(results["models"][model].get("accuracy")) + vs)
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Held-out metrics are the last evaluation of each job's run; intervals are 95% bootstrap intervals, "
           "differences are paired on the same prompts.", ""]
    return md


def headline(results: dict, export: dict) -> list[str]:
    """The result in a few lines: each trained model against its base, with 95% intervals.

    What the sweep was for, read from ``results.json`` (the score stage) and ``export.json``; the
    console ends with it and the report opens with it.
    """
    exported = export.get("winners") or {"winner": export["winner"]}
    models = results.get("models_order") or ["base", *exported]
    trained = [m for m in models if m != "base"]
    lines = []
    for m in trained:
        e = exported.get(m, {})
        lines.append(f"Result: {m} = job {e.get('job', '?')} ({console.brief_overrides(e.get('overrides', ''))}), "
                     f"{e.get('metric', '')} {e.get('value', float('nan')):.4f}; against its base on "
                     f"{results['prompts']} prompts ({results['quant']} GGUFs), 95% intervals:")
        base_acc, acc = results["models"]["base"].get("accuracy"), results["models"][m].get("accuracy")
        paired = results.get("accuracy_paired", {}).get(m, {})
        if base_acc and acc:
            lines.append(f"  exact-answer accuracy  base {_interval(base_acc)}  {m} {_interval(acc)}  "
                         f"paired difference {_diff(paired)}")
        for name, entry in results["metrics"].items():
            p = entry["paired"].get(m, {})
            note = "  (stand-in judge: means nothing)" if results.get("stand_in") else ""
            label = name.removeprefix("RESPONSE_").lower().replace("_", ", ")
            lines.append(f"  judge ({label})  base {_interval(entry.get('base'))}  "
                         f"{m} {_interval(entry.get(m))}  paired difference {_diff(p)}, "
                         f"wins/ties/losses {p.get('wins', 0)}/{p.get('ties', 0)}/{p.get('losses', 0)}{note}")
        ends = {k: results["models"][k]["ended_by_eos"] for k in ("base", m)}
        lines.append(f"  answers that end by themselves  base {ends['base']:.0%}  {m} {ends[m]:.0%}")
    return lines


def write_report(r: ReportInputs, report_dir: Path) -> Path:
    """``report.md`` with its figures in ``report_dir``; returns the Markdown file."""
    results, models, trained, rows, exported = r.results, r.models, r.trained, r.jobs, r.exported
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(r, report_dir / "training_curves.png")
    plot_scores(results, models, report_dir / "scores.png")
    md = [f"# orpolab report: {r.sweep.name}", "",
          f"Sweep folder `{r.sweep}`; MLflow parent run `{r.parent_run_id}`.", "",
          f"**Judge: {results['judge']}.**" + (STAND_IN_NOTE if results["stand_in"] else ""), "",
          "```", *headline(results, r.export), "```",
          "", f"Answers: {results['quant']} GGUFs of {', '.join(models)} on the CPU, generation settings "
          f"`{json.dumps(results['generation'])}`; {results['prompts']} prompts.", "",
          "## Sweep", "", f"Selection metric: `{rows[0]['metric'] if rows else ''}` (exported jobs are marked"
          + ("; one per method" if len(trained) > 1 else "") + ").", "",
          "| job | method | model | beta | lr | seed | status | selection value | exported |",
          "|---|---|---|---|---|---|---|---|---|"]
    for j in rows:
        value = f"{j['value']:.4f}" if j["value"] is not None else "-"
        mark = f"**{j['exported']}**" if j["exported"] else ""
        md.append(f"| {j['job']} | {j['method']} | {Path(j['model.name_or_path']).name} | {j['method.beta']} | "
                  f"{j['optim.lr']} | {j['seed']} | {j['status']} | {value} | {mark} |")
    md += ["", *seed_spread(rows), "", "## Training curves", "", "![training curves](training_curves.png)", ""]
    if len(trained) > 1:
        md += method_comparison(r)
    md += ["## Export verification", ""]
    for label, e in exported.items():
        md.append(f"- {label}: job {e['job']} ({e['overrides']}), merged model `{e.get('merged_model', '')}`.")
    md += ["", "| model | GGUF | token ids | ppl GGUF | ppl PyTorch | ratio (max) | top-1 agreement (min) | |",
           "|---|---|---|---|---|---|---|---|"]
    for c in r.export["verification"]:
        md.append(f"| {c.get('model', 'winner')} | {Path(c['gguf']).name} | "
                  f"{'identical' if not c['token_id_mismatches'] else 'differ'} | "
                  f"{c['ppl_gguf']:.3f} | {c['ppl_pytorch']:.3f} | {c['ppl_ratio']:.3f} ({c['max_ppl_ratio']}) | "
                  f"{c['top1_agreement']:.3f} ({c['min_top1_agreement']}) | {'ok' if c['passed'] else 'FAILED'} |")
    md += ["", "## Scores", "", "![scores](scores.png)", "",
           "| metric | model | score [95% CI] | base | model - base [95% CI] | wins / ties / losses | parse failures |",
           "|---|---|---|---|---|---|---|"]
    for name, e in results["metrics"].items():
        for m in trained:
            p = e["paired"][m]
            md.append(f"| {name} | {m} | {_interval(e.get(m))} | {_interval(e.get('base'))} | {_diff(p)} "
                      f"| {p['wins']} / {p['ties']} / {p['losses']} | {e['parse_failures']} |")
    acc = {m: results["models"][m].get("accuracy") for m in models}
    if all(acc.values()):
        md += ["", "Exact-answer accuracy (checked by a program: the right value, stated once): " + ", ".join(
            f"{m} {a['mean']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" for m, a in acc.items()) + "."]
        for m, p in results.get("accuracy_paired", {}).items():
            if "mean_diff" in p:
                md.append(f"- Paired on the same prompts, {m} - base: {p['mean_diff']:+.3f} "
                          f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] (95% bootstrap); {m} right and base wrong on "
                          f"{p['wins']} prompts, the reverse on {p['losses']}.")
        for name, e in results["metrics"].items():
            for m, a in e.get("agreement", {}).items():
                if a.get("n"):
                    md.append(f"- {name}, {m}: judge agrees with the checked answer on {a['agreement']:.0%} of "
                              f"{a['n']} answers (a judge that cannot tell right from wrong here should not be "
                              "trusted elsewhere).")
    md += ["", "## How the answers end", "", "| model | ended by itself | mean tokens | repeated 3-grams | skipped |",
           "|---|---|---|---|---|"]
    for m in models:
        s = results["models"][m]
        md.append(f"| {m} | {s['ended_by_eos']:.0%} | {s['mean_tokens']:.1f} | {s['mean_repeated_3gram_fraction']:.3f} "
                  f"| {s['skipped']} |")
    md += ["", "## Per prompt", "", *per_prompt_table(r)]
    out = report_dir / "report.md"
    tmp = report_dir / ".report.md.tmp"
    tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def per_prompt_table(r: ReportInputs) -> list[str]:
    """One row per prompt, one column per model (answer, judge score, checked result), the best marked."""
    models = r.models
    first_metric = next(iter(r.results["metrics"]), None)
    md = [f"Each cell: the answer, then the judge's {first_metric} score"
          " and, where the answer can be checked, ✓ (right) or ✗ (wrong). **best**: the models with the top judge "
          "score (checked answers first, when the prompt has one).", "",
          "| prompt | " + " | ".join(models) + " | best |", "|---" * (len(models) + 2) + "|"]
    for prompt in r.prompts:
        cells, ranked = [], {}
        for m in models:
            answer = r.answers.get(m, {}).get(prompt["id"], {}).get("answer", "")
            score = r.scores.get(m, {}).get(prompt["id"])
            correct = r.checked.get(m, {}).get(prompt["id"])
            mark = "" if correct is None else (" ✓" if correct else " ✗")
            cells.append(f"{_short(answer, 60)} ({score}){mark}")
            if score is not None and score >= 0:
                ranked[m] = (bool(correct), score)
        top = max(ranked.values()) if ranked else None
        best = [m for m, v in ranked.items() if v == top]
        best_text = "-" if not best or len(best) == len(models) else ", ".join(best)
        md.append(f"| {_short(prompt['prompt'], 60)} | " + " | ".join(cells) + f" | {best_text} |")
    return md
