"""Stage ``report``: gather what the report shows (MLflow, the stages' files) and write it.

The report itself (:mod:`orpolab.evaluate.report`) writes what it is given; this stage gathers it: the
results (scoring first if needed), prompts, answers and verdicts, the sweep's jobs and training curves
from MLflow, and the list of the sweep's evaluations. The report goes to
``<report root>/<sweep id>/<evaluation id>/``, ``<report root>/latest`` points at it, and it is logged on
this evaluation's MLflow run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orpolab.core import tracking
from orpolab.core.files import read_jsonl
from orpolab.evaluate import evaluations
from orpolab.evaluate.human import metrics as human_metrics
from orpolab.evaluate.plan import EvaluationPlan
from orpolab.evaluate.report import CURVES, SWEEP_PARAMS, ReportInputs, write_report
from orpolab.evaluate.review.fold import gather as gather_ratings
from orpolab.evaluate.stages import scores

TITLE = "report.md, plots, MLflow"


def sweep_jobs(tracking_uri: str, export: dict) -> list[dict]:
    """Every job of the sweep with its config, status and selection value, from MLflow."""
    exported = export.get("winners") or {"winner": export["winner"]}
    labels = {e["run_id"]: label for label, e in exported.items()}
    return [{"job": j.job_num, "run_id": j.run_id, "status": j.status, "metric": j.metric, "value": j.value,
             **{p: j.params.get(p, "") for p in SWEEP_PARAMS}, "method": j.method,
             "exported": labels.get(j.run_id, ""), "metrics": j.metrics}
            for j in tracking.job_records(tracking_uri, export["parent_run_id"])]


def point_latest(root: Path, target: Path) -> None:
    """``<root>/latest`` -> the newest report folder, replaced in one step (a symlink renamed over the old)."""
    link, tmp = root / "latest", root / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, root), target_is_directory=True)
    os.replace(tmp, link)


def first_metric_scores(plan: EvaluationPlan, results: dict) -> dict[str, dict[int, int]]:
    """Model -> prompt id -> the first metric's score, for the per-prompt table."""
    out: dict[str, dict[int, int]] = {m: {} for m in plan.models}
    first = next(iter(results["metrics"]), None)
    if first:
        for v in read_jsonl(plan.verdicts_file(first)):
            out.setdefault(v["model"], {})[v["id"]] = v["score"]
    return out


def notes(plan: EvaluationPlan, recorded: bool) -> list[str]:
    """The lines read first: which evaluation this is, and whether MLflow has it."""
    out = [f"Evaluation `{plan.id}` of this sweep: settings in `evaluation/{plan.id}/settings.yaml` of the sweep "
           "folder, results beside them."]
    if not recorded:
        out.append(f"**MLflow was not updated**: the tracking store `{plan.tracking_uri}` has no parent run "
                   f"`{plan.export['parent_run_id']}` for this sweep (a copy evaluated elsewhere?); results and "
                   "this report are local only, and the sweep table and training curves, which come from "
                   "MLflow, are empty.")
    return out


def gather(plan: EvaluationPlan, sweep_reports: Path, listed: list[dict]) -> ReportInputs:
    """Everything the report shows, from the stages' files and MLflow (``listed``: the sweep's evaluations)."""
    results_file = plan.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else scores.run(plan)
    answers = plan.answers()
    run_ = plan.tracking_run()
    jobs = sweep_jobs(plan.tracking_uri, plan.export) if run_ is not None else []
    c = tracking.client(plan.tracking_uri)
    curves = {j["run_id"]: {k: [(m.step, m.value) for m in c.get_metric_history(j["run_id"], k)] for k in CURVES}
              for j in jobs}
    scores_ = first_metric_scores(plan, results)
    boot = plan.settings.bootstrap
    # People's blind ratings (python -m orpolab.evaluate.review), read afresh: new ones need no new judging.
    human = gather_ratings(plan.out, plan.models, scores_, boot.n_resamples, boot.seed)
    return ReportInputs(sweep=plan.sweep, parent_run_id=plan.export["parent_run_id"], export=plan.export,
                        results=results, models=plan.models, prompts=plan.prompts, jobs=jobs, curves=curves,
                        answers=answers, scores=scores_, checked=plan.checked(answers), human=human,
                        evaluation_id=plan.id, notes=notes(plan, run_ is not None),
                        evaluations=evaluations.section(listed, plan.id, sweep_reports),
                        project_root=Path(str(plan.job_cfg.paths.root_dir)).resolve())


def run(plan: EvaluationPlan, report_root: Path) -> Path:
    """Write the report, point ``latest`` at it, refresh the other evaluations' lists, log it on MLflow."""
    report_root = Path(report_root)
    sweep_reports = report_root / plan.sweep.name
    report_dir = sweep_reports / plan.id
    listed = evaluations.evaluations(plan.sweep)
    inputs = gather(plan, sweep_reports, listed)
    out = write_report(inputs, report_dir)
    evaluations.refresh_others(listed, plan.id, sweep_reports)
    point_latest(report_root, report_dir)
    run_ = plan.tracking_run()
    if run_ is not None:
        if inputs.human:
            run_.log_metrics(human_metrics(inputs.human))
        for f in (out, report_dir / "training_curves.png", report_dir / "scores.png", plan.out / "results.json",
                  plan.out / "settings.yaml", *sorted(report_dir.glob("search_*.png"))):
            if f.is_file():
                run_.log_artifact(f, "report")
        run_.finish()
    return out
