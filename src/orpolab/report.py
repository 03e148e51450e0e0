"""The final report: sweep table, training curves, export checks, judge and objective scores.

Everything in it is read back from MLflow and the files the earlier stages wrote, so the report
can be rebuilt at any time (``python -m orpolab.evaluate <sweep> --stage report``).
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orpolab import tracking  # noqa: E402
from orpolab.generate import read_jsonl  # noqa: E402

if TYPE_CHECKING:
    from orpolab.evaluate import Evaluation

CURVES = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
          "train/rewards/accuracies")
SWEEP_PARAMS = ("model.name_or_path", "orpo.beta", "optim.lr", "seed")
STAND_IN_NOTE = " This report was scored by a stand-in, not by Flow Judge: its judge scores say nothing about quality."


def _interval(entry: dict, model: str) -> str:
    if model not in entry:
        return "-"
    e = entry[model]
    return f"{e['mean']:.3f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def sweep_rows(ev: Evaluation) -> list[dict]:
    """Every job of the sweep with its config, status and selection value, from MLflow."""
    c = tracking.client(ev.tracking_uri)
    parent = c.get_run(ev.export["parent_run_id"])
    runs = c.search_runs([parent.info.experiment_id],
                         filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'")
    rows = []
    for r in sorted(runs, key=lambda r: int(r.data.tags.get("orpolab.job_num", "0"))):
        metric = r.data.tags.get("orpolab.selection_metric", "")
        rows.append({"job": int(r.data.tags.get("orpolab.job_num", "0")), "run_id": r.info.run_id,
                     "status": r.info.status, "metric": metric, "value": r.data.metrics.get(f"best/{metric}"),
                     **{p: r.data.params.get(p, "") for p in SWEEP_PARAMS},
                     "winner": r.info.run_id == ev.export["winner"]["run_id"]})
    return rows


def plot_curves(ev: Evaluation, rows: list[dict], path: Path) -> None:
    c = tracking.client(ev.tracking_uri)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for row in rows:
        label = f"job {row['job']}" + (" (winner)" if row["winner"] else "")
        for ax, key in zip(axes, CURVES, strict=True):
            hist = c.get_metric_history(row["run_id"], key)
            if hist:
                ax.plot([m.step for m in hist], [m.value for m in hist], label=label,
                        linewidth=2.2 if row["winner"] else 1.0)
    for ax, key in zip(axes, CURVES, strict=True):
        ax.set_title(key.removeprefix("train/"))
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(results: dict, path: Path) -> None:
    """Mean judge score and objective accuracy of base and winner, with bootstrap intervals."""
    panels = [(f"judge: {name}", entry) for name, entry in results["metrics"].items()]
    if any("accuracy" in results["models"][m] for m in ("base", "winner")):
        panels.append(("exact-answer accuracy", {m: results["models"][m].get("accuracy") for m in ("base", "winner")}))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.2), squeeze=False)
    for ax, (title, entry) in zip(axes[0], panels, strict=False):
        names = [m for m in ("base", "winner") if entry.get(m)]
        means = [entry[m]["mean"] for m in names]
        err = [[entry[m]["mean"] - entry[m]["ci_low"] for m in names], [entry[m]["ci_high"] - entry[m]["mean"]
                                                                         for m in names]]
        ax.bar(names, means, yerr=err, capsize=6, color=["#999999", "#2b7bba"][: len(names)])
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


def write_report(ev: Evaluation, report_dir: Path) -> Path:
    """``report/report.md`` with its figures; also logged on the sweep's MLflow parent run."""
    results_file = ev.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else ev.score()
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(ev)
    plot_curves(ev, rows, report_dir / "training_curves.png")
    plot_scores(results, report_dir / "scores.png")
    w = ev.export["winner"]
    md = [f"# orpolab report: {ev.sweep.name}", "",
          f"Sweep folder `{ev.sweep}`; MLflow parent run `{ev.export['parent_run_id']}`.", "",
          f"**Judge: {results['judge']}.**" + (STAND_IN_NOTE if results["stand_in"] else ""),
          "", f"Answers: {results['quant']} GGUFs of base and winner on the CPU, generation settings "
          f"`{json.dumps(results['generation'])}`; {results['prompts']} prompts.", "",
          "## Sweep", "", f"Selection metric: `{rows[0]['metric'] if rows else ''}` (the winner is marked).", "",
          "| job | model | beta | lr | seed | status | selection value | |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        md.append(f"| {r['job']} | {Path(r['model.name_or_path']).name} | {r['orpo.beta']} | {r['optim.lr']} | "
                  f"{r['seed']} | {r['status']} | {value} | {'**winner**' if r['winner'] else ''} |")
    md += ["", *seed_spread(rows), "", "## Training curves", "", "![training curves](training_curves.png)", "",
           "## Export verification", "",
           f"Winner: job {w['job']} ({w['overrides']}), merged model `{ev.export['merged_model']}`.",
           "", "| GGUF | token ids | ppl GGUF | ppl PyTorch | ratio (max) | top-1 agreement (min) | |",
           "|---|---|---|---|---|---|---|"]
    for c in ev.export["verification"]:
        md.append(f"| {Path(c['gguf']).name} | {'identical' if not c['token_id_mismatches'] else 'differ'} | "
                  f"{c['ppl_gguf']:.3f} | {c['ppl_pytorch']:.3f} | {c['ppl_ratio']:.3f} ({c['max_ppl_ratio']}) | "
                  f"{c['top1_agreement']:.3f} ({c['min_top1_agreement']}) | {'ok' if c['passed'] else 'FAILED'} |")
    md += ["", "## Scores", "", "![scores](scores.png)", "",
           "| metric | base | winner | winner - base [95% CI] | wins / ties / losses | parse failures |",
           "|---|---|---|---|---|---|"]
    for name, e in results["metrics"].items():
        p = e["paired"]
        diff = f"{p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if "mean_diff" in p else "-"
        md.append(f"| {name} | {_interval(e, 'base')} | {_interval(e, 'winner')} | {diff} "
                  f"| {p['wins']} / {p['ties']} / {p['losses']} | {e['parse_failures']} |")
    acc = {m: results["models"][m].get("accuracy") for m in ("base", "winner")}
    if all(acc.values()):
        md += ["", "Exact-answer accuracy (checked by a program: the right value, stated once): " + ", ".join(
            f"{m} {a['mean']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" for m, a in acc.items()) + "."]
        p = results.get("accuracy_paired", {})
        if "mean_diff" in p:
            md.append(f"Paired on the same prompts, winner - base: {p['mean_diff']:+.3f} "
                      f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] (95% bootstrap), winner right and base wrong on "
                      f"{p['wins']} prompts, the reverse on {p['losses']}.")
        for name, e in results["metrics"].items():
            for m, a in e.get("agreement", {}).items():
                if a.get("n"):
                    md.append(f"- {name}, {m}: judge agrees with the checked answer on {a['agreement']:.0%} of "
                              f"{a['n']} answers (a judge that cannot tell right from wrong here should not be "
                              "trusted elsewhere).")
    md += ["", "## How the answers end", "", "| model | ended by itself | mean tokens | repeated 3-grams | skipped |",
           "|---|---|---|---|---|"]
    for m in ("base", "winner"):
        s = results["models"][m]
        md.append(f"| {m} | {s['ended_by_eos']:.0%} | {s['mean_tokens']:.1f} | {s['mean_repeated_3gram_fraction']:.3f} "
                  f"| {s['skipped']} |")
    md += ["", "## Per prompt", ""]
    answers = {m: {a["id"]: a for a in read_jsonl(ev.out / f"answers-{m}.jsonl")} for m in ("base", "winner")}
    first_metric = next(iter(results["metrics"]), None)
    verdicts = {(v["model"], v["id"]): v["score"] for v in read_jsonl(ev.out / f"verdicts-{first_metric}.jsonl")} \
        if first_metric else {}
    md += [f"Scores: {first_metric}.", "", "| prompt | base answer | winner answer | base | winner | better |",
           "|---|---|---|---|---|---|"]
    for prompt in ev.prompts():
        b, wv = verdicts.get(("base", prompt["id"])), verdicts.get(("winner", prompt["id"]))
        better = "-" if b is None or wv is None else ("winner" if wv > b else "base" if b > wv else "tie")
        base_answer = answers["base"].get(prompt["id"], {}).get("answer", "")
        winner_answer = answers["winner"].get(prompt["id"], {}).get("answer", "")
        md.append(f"| {_short(prompt['prompt'], 60)} | {_short(base_answer)} | {_short(winner_answer)} | {b} | {wv} "
                  f"| {better} |")
    out = report_dir / "report.md"
    tmp = report_dir / ".report.md.tmp"
    tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    run = tracking.JobRun(ev.tracking_uri, ev.export["parent_run_id"])
    for f in (out, report_dir / "training_curves.png", report_dir / "scores.png", results_file):
        if f.is_file():
            tracking.with_retry(lambda f=f: run.client.log_artifact(run.run_id, str(f), "report"))
    return out
