"""CPU evaluation: the Flow Judge backend, generation, stages run alone and resumed, the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from orpolab.core.errors import OrpolabError
from orpolab.core.files import read_jsonl
from orpolab.evaluate.judge import LlamaCppFlowJudge, metric_by_name, resolve_judge_file, verdict_grammar

from .helpers import evaluation_dir, runs


def evaluate_cli(sweep: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orpolab.evaluate", str(sweep["dir"]), *args],
                          capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": sweep["uri"]})


def test_judge_backend_gives_verdicts_flow_judge_parses(sweep, tmp_path):
    from flow_judge import EvalInput, FlowJudge

    metric = metric_by_name("RESPONSE_CORRECTNESS_3POINT")
    backend = LlamaCppFlowJudge(sweep["dir"] / "export" / "gguf" / "base-Q4_K_M.gguf",
                                [r.score for r in metric.rubric], max_tokens=48, max_feedback_chars=40)
    try:
        judge = FlowJudge(metric=metric, model=backend, output_dir=str(tmp_path / "fj"))
        inputs = [EvalInput(inputs=[{"query": f"What is {a} + 1?"}, {"reference_answer": f"The answer is {a + 1}."}],
                            output={"response": f"{a} + 1 = {a + 1}. The answer is {a + 1}."}) for a in range(4)]
        outputs = judge.batch_evaluate(inputs, save_results=False, use_tqdm=False)
        raw = backend._generate(judge._format_prompt(inputs[0]))
    finally:
        backend.close()
    assert all(o.score in (1, 2, 3) for o in outputs)  # the 3-point scale, never a parse failure (-1)
    assert raw.startswith("<feedback>") and raw.endswith("</score>")
    feedback = raw[len("<feedback>"): raw.index("</feedback>")]
    assert 1 <= len(feedback) <= 40


def test_verdict_grammar_bounds_feedback_and_lists_scores():
    g = verdict_grammar([3, 1, 2], 25)
    assert 'score ::= "1" | "2" | "3"' in g and "char{1,25}" in g


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(OrpolabError, match="RESPONSE_CORRECTNESS_5POINT.*RESPONSE_RELEVANCE_BINARY"):
        metric_by_name("HELPFULNESS_7POINT")


def test_judge_file_must_exist_and_be_gguf(tmp_path):
    with pytest.raises(OrpolabError, match="does not exist"):
        resolve_judge_file(str(tmp_path / "judge.gguf"), None, None)
    fake = tmp_path / "judge.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(OrpolabError, match="is not a GGUF file"):
        resolve_judge_file(str(fake), None, None)


@pytest.mark.subprocess
def test_stages_alone_resume_and_report(own_sweep, tmp_path):
    sweep = own_sweep
    out = evaluation_dir(sweep["dir"])  # the same settings: the same evaluation, in the same folder
    shutil.rmtree(sweep["dir"] / "evaluation")  # the hook evaluated already: start these stages afresh
    proc = evaluate_cli(sweep, "--stage", "generate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = read_jsonl(out / "answers-winner.jsonl")
    assert len(answers) == 6 and {a["finish_reason"] for a in answers} <= {"stop", "length"}
    # A half-finished evaluation resumes: drop the last two answers, run again, nothing is duplicated.
    lines = (out / "answers-winner.jsonl").read_text().splitlines()
    (out / "answers-winner.jsonl").write_text("\n".join(lines[:4]) + "\n")
    assert evaluate_cli(sweep, "--stage", "generate").returncode == 0
    resumed = read_jsonl(out / "answers-winner.jsonl")
    assert [a["id"] for a in resumed] == [0, 1, 2, 3, 4, 5]
    assert resumed[:4] == answers[:4] and resumed[4:] == answers[4:]  # greedy: the same answers again

    assert evaluate_cli(sweep, "--stage", "calibrate").returncode == 0
    cal = json.loads((out / "calibration.json").read_text())["metrics"]["RESPONSE_CORRECTNESS_5POINT"]
    assert cal["pairwise"]["n"] + cal["pairwise"].get("missing", 0) == 4 and cal["auc"]["n"] == 8

    assert evaluate_cli(sweep, "--stage", "judge").returncode == 0
    verdicts = read_jsonl(out / "verdicts-RESPONSE_CORRECTNESS_5POINT.jsonl")
    assert len(verdicts) == 18 and all(1 <= v["score"] <= 5 for v in verdicts)  # base, winner, winner@F16
    assert "STAND-IN" in verdicts[0]["judge"]

    assert evaluate_cli(sweep, "--stage", "score").returncode == 0
    results = json.loads((out / "results.json").read_text())
    for model in ("base", "winner", "winner@F16"):
        for figure in ("value_right", "exact"):
            acc = results["models"][model]["checks"][figure]
            assert acc["n"] == 6 and acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    assert set(results["quant_costs"]["rows"]) == {"F16", "Q4_K_M"}
    paired = results["metrics"]["RESPONSE_CORRECTNESS_5POINT"]["paired"]["winner"]
    assert paired["wins"] + paired["ties"] + paired["losses"] == 6

    report_dir = tmp_path / "report"
    proc = evaluate_cli(sweep, "--stage", "report", "--report-dir", str(report_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = report_dir / sweep["dir"].name / out.name
    text = (reports / "report.md").read_text()
    for section in ("## Data", "## Sweep", "## Training curves", "## Export verification", "## Judge",
                    "Judge calibration", "## Scores", "## What quantization costs", "## How the answers end",
                    "Length sensitivity", "## Per prompt", "STAND-IN"):
        assert section in text, section
    assert (reports / "training_curves.png").stat().st_size > 10_000
    assert (reports / "scores.png").stat().st_size > 5_000
    # The sweep table's numbers are the MLflow runs' numbers.
    client = MlflowClient(sweep["uri"])
    export = json.loads((sweep["dir"] / "export" / "export.json").read_text())
    children = runs(sweep["uri"], f"tags.`mlflow.parentRunId` = '{export['parent_run_id']}'")
    for run in (r for r in children if r.data.tags["orpolab.role"] == "job"):
        assert f"| {run.data.metrics['best/val/chosen_bpb']:.4f} |" in text
    # The report is logged on the evaluation's own run, nested under the sweep's parent run.
    (evaluation,) = [r for r in children if r.data.tags.get("orpolab.evaluation_id") == out.name]
    assert "report/report.md" in {a.path for a in client.list_artifacts(evaluation.info.run_id, "report")}


def test_empty_prompt_set_is_a_clear_error(sweep, tmp_path):
    from omegaconf import OmegaConf

    from orpolab.evaluate.prompts import load_prompts

    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    cfg = OmegaConf.create({"kind": "fields", "path": str(empty), "split": "train", "prompt_field": "prompt",
                            "reference_field": None, "checker": None, "max_prompts": 10})
    with pytest.raises(OrpolabError, match="prompt set .* is empty"):
        load_prompts(cfg, OmegaConf.create({}))


def test_evaluation_without_export_says_what_to_run(tmp_path):
    from orpolab.evaluate.plan import EvaluationPlan

    with pytest.raises(OrpolabError, match="has no export.*python -m orpolab.export"):
        EvaluationPlan(tmp_path, "sqlite:///unused.db")


def test_prompt_longer_than_the_context_is_skipped_and_counted(sweep, tmp_path):
    from orpolab.core.defaults import default_settings
    from orpolab.evaluate.generate import answer_prompts

    prompts = [{"id": 0, "prompt": "Let k = 5. What is k?"}, {"id": 1, "prompt": "Let k = 5. " * 200 + "What is k?"}]
    rows = answer_prompts(sweep["dir"] / "export" / "gguf" / "winner-Q4_K_M.gguf", prompts, tmp_path / "a.jsonl",
                          default_settings("evaluation.generation", max_tokens=16, n_ctx=256), "winner")
    assert "answer" in rows[0] and rows[1] == {"id": 1, "model": "winner", "skipped": "prompt_too_long"}
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 2  # written down, not silently lost
