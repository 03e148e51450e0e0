"""Stage ``calibrate``: the judge scores answers of known quality before it scores the models (cached per judge).

The figures say how far the verdicts can be trusted; :mod:`orpolab.evaluate.calibration` holds the
sets, the cache and the figures.
"""

from __future__ import annotations

from pathlib import Path

from orpolab.core.files import write_json_atomic
from orpolab.evaluate.calibration import calibrate, flow_judge_scorer
from orpolab.evaluate.judge import metric_by_name
from orpolab.evaluate.plan import EvaluationPlan
from orpolab.evaluate.prompts import test_pairs
from orpolab.evaluate.stats import figure_text

TITLE = "the judge on answers of known quality (cached per judge)"


def calibration_sets(plan: EvaluationPlan) -> tuple[list[dict], list[dict]]:
    """Preference pairs (chosen, rejected) of the test split, and the checkable evaluation prompts."""
    pairs = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}
             for _, prompt, chosen, rejected in test_pairs(plan.job_cfg)]
    checkable = [{"prompt": p["prompt"], "expected": p["expected"]} for p in plan.prompts
                 if p.get("expected") is not None] if plan.checker else []
    return pairs, checkable


def calibration_line(result: dict) -> str:
    """One console line for a metric's calibration figures."""
    parts = []
    if result.get("pairwise"):
        parts.append(f"P(chosen scored higher) + ½ ties {figure_text(result['pairwise'])} on "
                     f"{result['pairwise'].get('n', 0)} test pairs")
    if result.get("auc"):
        parts.append(f"AUC {figure_text(result['auc'])} on {result['auc'].get('n', 0)} checked answers")
    cached = " (cached)" if result.get("cached") else ""
    return "; ".join(parts) + f": {result.get('verdict', '')}{cached}"


def run(plan: EvaluationPlan) -> dict:
    j = plan.settings.judge
    out: dict = {"size": j.calibration_size, "metrics": {}}
    if not j.calibration_size:
        out["enabled"] = False
        write_json_atomic(plan.out / "calibration.json", out)
        print("    calibration off (evaluation.judge.calibration_size=0): the judge is unmeasured", flush=True)
        return out
    pairs, checkable = calibration_sets(plan)
    boot = plan.settings.bootstrap
    with flow_judge_scorer(plan.judge_backend) as scorer:
        for name in j.metrics:
            ident = plan.judge_identity(name)
            verdict_settings = {k: ident[k] for k in ("grammar_sha256", "sampling")}
            result = calibrate(scorer, metric_by_name(name), pairs, checkable, plan.checker,
                               Path(str(j.calibration_cache)), plan.judge_file(), settings=verdict_settings,
                               size=j.calibration_size, seed=boot.seed, n_resamples=boot.n_resamples)
            out["metrics"][name] = result
            print(f"    {name}: {calibration_line(result)}", flush=True)
    out["enabled"] = True
    write_json_atomic(plan.out / "calibration.json", out)
    return out
