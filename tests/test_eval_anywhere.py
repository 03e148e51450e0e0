"""Evaluate any time, anywhere: evaluation settings are not a sweep's identity, the stage commands take
overrides, several evaluations of one sweep sit side by side, and a sweep folder can move."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orpolab.core.errors import OrpolabError

from .helpers import EVAL_SMALL, ROOT, SWEEP_TRAINING, compose, evaluation_dir, private_copy, run_train, runs


def evaluate_cli(folder: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orpolab.evaluate", str(folder), *args], capture_output=True,
                          text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def runs_of(uri: str, parent_run_id: str, role: str) -> list:
    nested = runs(uri, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return [r for r in nested if r.data.tags.get("orpolab.role") == role]


def laptop_copy(sweep_dir: Path, target: Path) -> Path:
    """What README's rsync line copies: the recorded configs, export.json and the GGUFs; nothing else."""
    for path in sweep_dir.rglob("*"):
        rel = path.relative_to(sweep_dir)
        wanted = (rel.as_posix() in ("multirun.yaml", "export/export.json")
                  or (rel.parent.as_posix() == "export/gguf" and path.suffix == ".gguf")
                  or rel.parent.name == ".hydra")
        if wanted and path.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / rel)
    return target


def test_the_sweep_id_leaves_out_what_acts_after_training(tmp_path):
    from omegaconf import open_dict, read_write

    from orpolab.sweep.sweep_id import derive

    def sweep_id(*overrides: str) -> str:
        """The id of `train.py -m experiment=demo <overrides> orpo.beta=0.05,0.1`: the overrides and the config."""
        cfg = compose(["experiment=demo", *overrides], tmp_path)
        with read_write(cfg.hydra.overrides), open_dict(cfg.hydra.overrides):
            cfg.hydra.overrides.task = ["experiment=demo", *overrides, "orpo.beta=0.05,0.1"]
        return derive(cfg)

    same = sweep_id()
    assert sweep_id("eval_prompts=finetome", "evaluation.judge.path=/x.gguf", "evaluation.quants=[Q8_0]",
                    "export.quant_types=[Q4_K_M,Q8_0]", "export.include_base=false") == same
    # Training settings, and the selection metric (it keeps each job's best checkpoint), are the identity.
    assert sweep_id("optim.warmup_ratio=0.1") != same and sweep_id("selection.mode=max") != same


@pytest.mark.subprocess
def test_a_rerun_with_other_evaluation_settings_trains_nothing_and_adds_an_evaluation(sweep, tmp_path):
    own = private_copy(sweep, tmp_path)
    first = evaluation_dir(own["dir"]).name
    # The first evaluation's report, as the sweep's hook wrote it, in the report folder of the re-run.
    reports = tmp_path / "report"
    shutil.copytree(sweep["report"].parent, reports / own["dir"].name / first)
    changed = {"eval_prompts.max_prompts": "3", "evaluation.quants": "[]", "evaluation.judge.calibration_size": "0"}
    small = [o for o in EVAL_SMALL if o.split("=")[0] not in changed] + [f"{k}={v}" for k, v in changed.items()]
    proc = run_train(["-m", "experiment=demo", *SWEEP_TRAINING,
                      f"evaluation.judge.calibration_cache={sweep['dir'].parent / 'calibration'}",
                      f"evaluation.store_dir={sweep['dir'].parent / 'store'}",
                      "orpo.beta=0.05,0.1", f"hydra.sweep.dir={own['dir']}", f"paths.report_dir={reports}",
                      "export.quant_types=[Q4_K_M,Q8_0]", *small], env_extra={"MLFLOW_TRACKING_URI": own["uri"]})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    # Nothing trained: both jobs were found finished; the export is the one already there.
    assert proc.stdout.count("finished in an earlier run of this sweep") == 2, proc.stdout[-3000:]
    assert "export: up to date" in proc.stdout
    parent_id = json.loads((own["dir"] / "export" / "export.json").read_text())["parent_run_id"]
    jobs = runs_of(own["uri"], parent_id, "job")
    assert len(jobs) == 2 and all("orpolab.attempts" not in j.data.tags for j in jobs)
    # A second evaluation beside the first, made with the new settings.
    ids = sorted(f.name for f in (own["dir"] / "evaluation").iterdir())
    (second,) = set(ids) - {first}
    results = json.loads((own["dir"] / "evaluation" / second / "results.json").read_text())
    assert results["prompts"] == 3 and results["models_order"] == ["base", "winner"]
    assert "max_prompts: 3" in (own["dir"] / "evaluation" / second / "settings.yaml").read_text()
    assert json.loads((own["dir"] / "evaluation" / first / "results.json").read_text())["prompts"] == 6
    # Both reports exist and name each other; latest is the new one.
    a, b = (reports / own["dir"].name / i / "report.md" for i in (first, second))
    assert f"[{second}](../{second}/report.md)" in a.read_text()
    assert f"[{first}](../{first}/report.md)" in b.read_text()
    assert (reports / "latest").resolve() == b.parent.resolve()
    # Each evaluation is a nested run of the sweep's parent run.
    nested = {r.data.tags["orpolab.evaluation_id"] for r in runs_of(own["uri"], parent_id, "evaluation")}
    assert nested == {first, second}


@pytest.mark.subprocess
def test_evaluate_judges_with_the_overridden_judge_file_and_prompt_set(sweep, tmp_path):
    own = private_copy(sweep, tmp_path)
    judge = own["dir"] / "export" / "gguf" / "winner-Q8_0.gguf"
    proc = evaluate_cli(own["dir"], own["uri"], "eval_prompts=heldout", "eval_prompts.max_prompts=2",
                        f"evaluation.judge.path={judge}", "evaluation.quants=[]",
                        "evaluation.judge.calibration_size=0", "--report-dir", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [f for f in (own["dir"] / "evaluation").iterdir() if f.name != evaluation_dir(sweep["dir"]).name]
    results = json.loads((folder / "results.json").read_text())
    assert results["judge_identity"]["RESPONSE_CORRECTNESS_5POINT"]["file"] == "winner-Q8_0.gguf"
    assert results["splits"]["evaluation_prompts"]["source"] == "the test split" and results["checks"] == []
    # The same settings name the same evaluation, whose prompts are the test split's first two.
    from orpolab.evaluate.plan import EvaluationPlan

    again = EvaluationPlan(own["dir"], own["uri"], ["eval_prompts=heldout", "eval_prompts.max_prompts=2",
                                                f"evaluation.judge.path={judge}", "evaluation.quants=[]",
                                                "evaluation.judge.calibration_size=0"])
    assert again.out == folder
    test_rows = [json.loads(line) for line in (ROOT / "data" / "sample" / "test.jsonl").open()]
    assert [p["prompt"] for p in again.prompts] == [r["prompt"] for r in test_rows[:2]]
    verdicts = [json.loads(line) for line in (folder / "verdicts-RESPONSE_CORRECTNESS_5POINT.jsonl").open()]
    assert len(verdicts) == 4 and all("winner-Q8_0.gguf" in v["judge"] for v in verdicts)
    assert f"path: {judge}" in (folder / "settings.yaml").read_text()


@pytest.mark.subprocess
def test_a_bad_override_is_refused_before_any_work(sweep, tmp_path, monkeypatch):
    import llama_cpp

    from orpolab.evaluate.plan import EvaluationPlan

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)  # a CPU build, as here

    copy = laptop_copy(sweep["dir"], tmp_path / "sweep")
    for override, message in (("evaluation.bogus=1", "evaluation.bogus: Key 'bogus' not in 'EvaluationConfig'"),
                              ("evaluation.quants=[Q9]", "Invalid value 'Q9'"),
                              ("model.lr=1", "takes overrides of evaluation, eval_prompts only"),
                              ("evaluation.judge.path=/no/judge.gguf", "judge file /no/judge.gguf does not exist"),
                              ("evaluation.quants=[Q5_K_M]", "Q5_K_M not exported"),
                              ("evaluation.judge.n_gpu_layers=-1", "evaluation.judge.n_gpu_layers=-1 asks for the GPU, "
                               "but this llama-cpp-python build has no GPU backend; rebuild .*-DGGML_CUDA=on")):
        with pytest.raises(OrpolabError, match=message.replace("[", r"\[")):
            EvaluationPlan(copy, sweep["uri"], [override])
    proc = evaluate_cli(copy, sweep["uri"], "eval_prompts=nosuch")
    assert proc.returncode == 1 and proc.stderr.startswith("error: Could not find 'eval_prompts/nosuch'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (copy / "evaluation").exists() and not (copy / "logs").exists()  # nothing started


@pytest.mark.subprocess
def test_a_moved_sweep_without_checkpoints_or_mlflow_evaluates_and_reports(sweep, tmp_path):
    from omegaconf import OmegaConf

    copy = laptop_copy(sweep["dir"], tmp_path / "elsewhere" / "sweep")
    assert not list(copy.rglob("*.ckpt")) and not (copy / "export" / "merged").exists()
    # Nothing orpolab wrote in the folder names where it was (the resolved config copy is a record only).
    export = json.loads((copy / "export" / "export.json").read_text())
    export["winner"].pop("config")
    for written in (export, json.loads((sweep["dir"] / "0" / "result.json").read_text())):
        assert str(sweep["dir"]) not in json.dumps(written)
    # The base model is not on this machine: the evaluation must not need it.
    for job_config in copy.glob("*/.hydra/config.yaml"):
        cfg = OmegaConf.load(job_config)
        cfg.model.name_or_path = str(tmp_path / "no-base-model-here")
        OmegaConf.save(cfg, job_config)
    empty_store = f"sqlite:///{tmp_path / 'laptop.db'}"
    proc = evaluate_cli(copy, empty_store, "eval_prompts.max_prompts=2", "evaluation.quants=[]",
                        "--report-dir", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = evaluation_dir(copy)
    assert json.loads((folder / "results.json").read_text())["prompts"] == 2
    report = (tmp_path / "report" / "latest" / "report.md").read_text()
    assert "**MLflow was not updated**" in report and "## Scores" in report
    client = MlflowClient(empty_store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.subprocess
def test_a_failed_evaluation_marks_its_nested_run_failed(sweep, tmp_path):
    from orpolab.core import tracking

    own = private_copy(sweep, tmp_path)
    parent = json.loads((own["dir"] / "export" / "export.json").read_text())["parent_run_id"]
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    # The report stage reopens the evaluation's nested run, then cannot write under a file.
    proc = evaluate_cli(own["dir"], own["uri"], "--stage", "report", "--report-dir", str(blocker / "report"))
    assert proc.returncode != 0
    (run,) = runs_of(own["uri"], parent, tracking.EVALUATION_ROLE)
    assert run.info.status == "FAILED" and "orpolab.error" in run.data.tags
