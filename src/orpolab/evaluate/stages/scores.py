"""Stage ``score``: checked figures, judge scores, paired differences and bootstrap intervals -> ``results.json``.

Every figure is paired on the same prompts (each trained model against the base; each quantization of
the winner against F16) and carries a bootstrap interval (``evaluation.bootstrap``).
"""

from __future__ import annotations

import dataclasses
import json

from omegaconf import DictConfig

from orpolab.core import records
from orpolab.core.config import DataConfig, settings
from orpolab.core.files import read_jsonl, write_json_atomic
from orpolab.evaluate.plan import EvaluationPlan
from orpolab.evaluate.stats import bootstrap_mean_ci, length_regression, paired_comparison
from orpolab.train.data import overlap, three_splits

TITLE = "means, paired differences, bootstrap intervals"


def splits(plan: EvaluationPlan) -> dict:
    """Which data each figure comes from, with sizes, and whether the evaluation prompts leak.

    The evaluation prompts are compared with the training and validation prompts (identical up to
    whitespace); the report shows the counts, so a prompt file that overlaps is seen, not trusted.
    """
    data_cfg = settings(DataConfig, plan.job_cfg.data, "data")
    s = three_splits(data_cfg)
    texts = [p["prompt"] for p in plan.prompts]
    kind = str(plan.prompt_settings.kind)
    return {
        "train": {"rows": len(s.train), "source": s.sources["train"], "used_for": "training"},
        "validation": {"rows": len(s.validation), "source": s.sources["validation"],
                       "used_for": "checkpoint and winner selection, export verification"},
        "test": {"rows": len(s.test), "source": s.sources["test"],
                 "used_for": "judge calibration" + (", evaluation prompts" if kind == "heldout" else "")},
        "evaluation_prompts": {"n": len(texts), "kind": kind,
                               "source": "the test split" if kind == "heldout" else str(plan.prompt_settings.path),
                               "in_train": overlap(texts, s.train, data_cfg),
                               "in_validation": overlap(texts, s.validation, data_cfg)},
    }


def self_preference(job_cfg: DictConfig) -> dict:
    """Whether the judge judges its own family (``model.family`` = ``evaluation.judge.family``).

    Judges tend to prefer text of their own lineage; the report says so in its first lines.
    """
    family, judge_family = job_cfg.model.family, job_cfg.evaluation.judge.family
    return {"model_family": family, "judge_family": judge_family,
            "same": bool(family and judge_family and family == judge_family)}


def answer_stats(rows: list[dict]) -> dict:
    """How a model's answers ended: answered, skipped, ended by end-of-turn, hit the budget, length, repetition."""
    answered = [r for r in rows if "answer" in r]
    k = max(1, len(answered))
    return {"answered": len(answered), "skipped": sum("skipped" in r for r in rows),
            "ended_by_eos": sum(r["finish_reason"] == "stop" for r in answered) / k,
            "hit_budget": sum(r["finish_reason"] == "length" for r in answered),
            "mean_tokens": sum(r["completion_tokens"] for r in answered) / k,
            "mean_repeated_3gram_fraction": sum(r["repeated_3gram_fraction"] for r in answered) / k}


def mean_ci(values: list[float], n: int, seed: int) -> dict:
    lo, hi = bootstrap_mean_ci(values, n, seed=seed)
    return {"mean": sum(values) / len(values), "ci_low": lo, "ci_high": hi, "n": len(values)}


def length_sensitivity(scores: list, base_scores: list, tokens: list, base_tokens: list, n: int, seed: int) -> dict:
    """Per prompt, score difference regressed on answer-length difference (tokens): a sensitivity figure."""
    rows = [(s - b, t - u) for s, b, t, u in zip(scores, base_scores, tokens, base_tokens, strict=True)
            if None not in (s, b, t, u)]
    return length_regression([d for d, _ in rows], [x for _, x in rows], n, seed)


def judge_metric(plan: EvaluationPlan, metric_name: str, tokens: dict[str, list], n: int, seed: int
                 ) -> tuple[dict, dict[str, list]]:
    """One metric's figures, and its score per model on each judged prompt (None: no verdict)."""
    verdicts = read_jsonl(plan.verdicts_file(metric_name))
    score = {(v["model"], v["id"]): (v["score"] if v["score"] >= 0 else None) for v in verdicts}
    per = {m: [score.get((m, p["id"])) for p in plan.judged] for m in plan.models}
    entry = {"parse_failures": sum(v["score"] < 0 for v in verdicts), "verdicts": len(verdicts),
             "paired": {m: paired_comparison(per[m], per["base"], n, seed) for m in plan.trained},
             "length": {m: length_sensitivity(per[m], per["base"], tokens[m], tokens["base"], n, seed)
                        for m in plan.trained}}
    for m in plan.models:
        vals = [s for s in per[m] if s is not None]
        if vals:
            entry[m] = mean_ci(vals, n, seed)
    return entry, per


def quant_costs(labels: dict[str, str], checked: dict, figures: list[str], metrics: dict,
                judge_scores: dict[str, dict[str, list]], n: int, seed: int) -> dict:
    """Per quantization of the winner: checked figures and judge score, each paired against F16.

    ``judge_scores``: metric -> model -> its score on each judged prompt (None: no verdict), as scored.
    """
    reference = "F16" if "F16" in labels else next(iter(labels))
    rows: dict[str, dict] = {}
    for q, label in labels.items():
        row: dict = {"model": label}
        for fig in figures:
            values = [float(c[fig]) for c in checked.get(label, {}).values()]
            if values:
                row[fig] = sum(values) / len(values)
                if q != reference:
                    ref = [float(c[fig]) for c in checked[labels[reference]].values()]
                    row[f"{fig}_vs_{reference}"] = paired_comparison(values, ref, n, seed)
        for name, per in judge_scores.items():
            if metrics[name].get(label):
                row[f"judge_{name}"] = metrics[name][label]["mean"]
            if q != reference:
                row[f"judge_{name}_vs_{reference}"] = paired_comparison(per[label], per[labels[reference]], n, seed)
        rows[q] = row
    return {"reference": reference, "rows": rows}


def header(plan: EvaluationPlan) -> dict:
    """What the figures are of: prompts, judge, models, settings, data splits, calibration."""
    calibration_file, reuse_file = plan.out / "calibration.json", plan.out / "reuse.json"
    return {
        "prompts": len(plan.prompts), "judge": plan.judge_name(), "models_order": list(plan.models),
        "trained": list(plan.trained), "stand_in": bool(plan.settings.judge.stand_in),
        "generation": dataclasses.asdict(plan.settings.generation),
        "quant": plan.quant, "quant_labels": plan.quant_labels,
        "checks": list(getattr(plan.checker, "figures", ())) if plan.checker else [],
        "splits": splits(plan),
        "judge_identity": {m: plan.judge_identity(m) for m in plan.settings.judge.metrics},
        "calibration": json.loads(calibration_file.read_text()) if calibration_file.is_file() else None,
        "self_preference": self_preference(plan.job_cfg),
        "reuse": json.loads(reuse_file.read_text()) if reuse_file.is_file() else None,
        "models": {}, "metrics": {},
    }


def run(plan: EvaluationPlan) -> dict:
    n, seed = plan.settings.bootstrap.n_resamples, plan.settings.bootstrap.seed
    answers = plan.answers()
    checked = plan.checked(answers)
    results = header(plan)
    figures = results["checks"]
    for m in plan.models:
        stats = answer_stats([answers[m].get(p["id"], {}) for p in plan.prompts])
        for fig in figures:
            values = [float(c[fig]) for c in checked[m].values()]
            if values:
                stats.setdefault("checks", {})[fig] = mean_ci(values, n, seed)
        results["models"][m] = stats
    if checked:
        def figure(m: str, fig: str) -> list[float]:
            return [float(c[fig]) for c in checked[m].values()]

        # Each trained model against the base, on the same prompts.
        results["checks_paired"] = {fig: {m: paired_comparison(figure(m, fig), figure("base", fig), n, seed)
                                          for m in plan.trained} for fig in figures}
    results["judged_prompts"] = len(plan.judged)
    tokens = {m: [answers[m].get(p["id"], {}).get("completion_tokens") for p in plan.judged] for m in plan.models}
    judge_scores: dict[str, dict[str, list]] = {}  # metric -> model -> score per judged prompt
    for metric_name in plan.settings.judge.metrics:
        results["metrics"][metric_name], judge_scores[metric_name] = judge_metric(plan, metric_name, tokens, n, seed)
    if len(plan.quant_labels) > 1:
        results["quant_costs"] = quant_costs(plan.quant_labels, checked, figures, results["metrics"],
                                             judge_scores, n, seed)
    write_json_atomic(plan.out / "results.json", results)
    log_results(plan, results)
    return results


def log_results(plan: EvaluationPlan, results: dict) -> None:
    """Calibration, quantization costs and the judge's identity on this evaluation's MLflow run (if any)."""
    run_ = plan.tracking_run()
    if run_ is None:
        return
    metrics: dict[str, float] = {}
    for name, c in ((results.get("calibration") or {}).get("metrics") or {}).items():
        for part in ("pairwise", "auc"):
            entry = c.get(part) or {}
            if entry.get("value") is not None:
                metrics[f"calibration/{name}/{part}"] = entry["value"]
                metrics[f"calibration/{name}/{part}_ci_low"] = entry["ci_low"]
    for stage, counts in (results.get("reuse") or {}).items():
        metrics.update({f"reuse/{stage}_reused": counts["reused"], f"reuse/{stage}_made": counts["made"],
                        f"reuse/{stage}_seconds_saved": counts["seconds_saved"]})
    for q, row in (results.get("quant_costs") or {}).get("rows", {}).items():
        for key, value in row.items():
            if isinstance(value, int | float):
                metrics[f"quant/{q}/{key}"] = value
    if metrics:
        run_.log_metrics(metrics)
    tags = {}
    for name, ident in results["judge_identity"].items():
        tags.update({f"{records.JUDGE}.{name}.file": ident["file"], f"{records.JUDGE}.{name}.sha256": ident["sha256"],
                     f"{records.JUDGE}.{name}.prompt_template": ident["prompt_template_sha256"]})
    run_.set_tags(tags)
