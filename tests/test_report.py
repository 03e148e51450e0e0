"""The report's own logic on hand-made inputs: warnings first, rows of the exported checkpoint, one folder per sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpolab.evaluate.calibration import calibrate
from orpolab.evaluate.judge import metric_by_name
from orpolab.evaluate.report import held_out_cell
from orpolab.evaluate.report_results import warnings
from orpolab.evaluate.stages.scores import self_preference

from .helpers import compose, evaluation_dir, private_copy


def test_self_preference_warning_for_a_phi3_candidate_under_a_phi3_judge(tmp_path):
    phi = self_preference(compose(["model=phi35"], tmp_path))  # Flow Judge (phi3) judging Phi-3.5-mini
    assert phi == {"model_family": "phi3", "judge_family": "phi3", "same": True}
    assert any("Self-preference warning" in w and "phi3" in w for w in warnings({"self_preference": phi}))
    llama = self_preference(compose(["model=llama1b"], tmp_path))
    assert not llama["same"] and not any("Self-preference" in w for w in warnings({"self_preference": llama}))
    # The offline stand-in judges its own family in demo-real.
    real = self_preference(compose(["model=smollm2", "evaluation.judge.family=smollm2"], tmp_path))
    assert real["same"]


def test_a_constant_judge_is_called_uninformative_in_the_first_lines(tmp_path):
    from orpolab.demo.sample_task import LookupChecker

    pairs = [{"prompt": f"Let x = {i}. What is x?", "chosen": f"x = {i}.", "rejected": f"x = {i + 1}."}
             for i in range(12)]
    checkable = [{"prompt": p["prompt"], "expected": i} for i, p in enumerate(pairs)]
    result = calibrate(lambda metric, inputs, answer: 3, metric_by_name("RESPONSE_CORRECTNESS_5POINT"), pairs,
                       checkable, LookupChecker(), tmp_path / "cache", Path(__file__), size=12)
    assert result["pairwise"]["value"] == 0.5 and result["auc"]["value"] == 0.5
    first = warnings({"calibration": {"enabled": True, "metrics": {"RESPONSE_CORRECTNESS_5POINT": result}}})[0]
    assert "no better than chance: its scores below are uninformative" in first
    assert "0.500 [0.50, 0.50]" in first
    unmeasured = warnings({"calibration": {"enabled": False}})[0]
    assert "unmeasured" in unmeasured


def test_a_row_shows_its_best_checkpoint_and_the_last_evaluation_beside_it():
    job = {"metrics": {"best/val/chosen_bpb": 0.2140, "val/chosen_bpb": 0.3255}}
    assert held_out_cell(job, "val/chosen_bpb", "{:.4f}") == "0.2140 (last: 0.3255)"
    same = {"metrics": {"best/val/chosen_bpb": 0.2140, "val/chosen_bpb": 0.2140}}
    assert held_out_cell(same, "val/chosen_bpb", "{:.4f}") == "0.2140"


@pytest.mark.subprocess
def test_two_sweeps_keep_two_reports_and_latest_points_at_the_newest(sweep, tmp_path):
    reports = tmp_path / "report"
    evaluation = evaluation_dir(sweep["dir"]).name  # copies evaluated with the same settings: the same id
    for name in ("sweep-a", "sweep-b"):
        copy = private_copy(sweep, tmp_path, name)
        proc = subprocess.run([sys.executable, "-m", "orpolab.evaluate", str(copy["dir"]), "--stage", "report",
                               "--report-dir", str(reports)], capture_output=True, text=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": copy["uri"]})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().endswith(f"report: {reports / name / evaluation / 'report.md'}")
    a, b = (reports / n / evaluation / "report.md" for n in ("sweep-a", "sweep-b"))
    assert "# orpolab report: sweep-a" in a.read_text() and "# orpolab report: sweep-b" in b.read_text()
    assert (reports / "latest").resolve() == (reports / "sweep-b" / evaluation).resolve()
    assert json.loads((evaluation_dir(sweep["dir"]) / "results.json").read_text())["prompts"] == 6


def test_evaluation_prompts_found_in_the_training_data_are_called_a_leak():
    leak = {"splits": {"evaluation_prompts": {"in_train": 3, "in_validation": 1}}}
    assert any(w.startswith("**Leak**: 3 evaluation prompts also appear in the training data and 1 in the validation")
               for w in warnings(leak))
    clean = {"splits": {"evaluation_prompts": {"in_train": 0, "in_validation": 0}}}
    assert not any("Leak" in w for w in warnings(clean))
