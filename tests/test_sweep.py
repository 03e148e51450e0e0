"""Hydra multiruns as a user starts them: parent/child MLflow runs, failures that do not stop a sweep."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from .helpers import RANDOM_TINY, ROOT, job_runs, run_train, runs

# For tests about sweeps, not learning: 6 steps, each validation on 10 held-out pairs instead of all 100.
QUICK = ["experiment=demo", RANDOM_TINY, "trainer.max_steps=6", "trainer.val_check_interval=3", "export.enabled=false",
         "trainer.enable_progress_bar=false", "data.max_eval_rows=10"]

# For tests about how a sweep ends, not what it learns: a few held-out pairs, no evaluation at step 0,
# one thread (two threads that wait on each other slow a model this small down on a busy machine).
SMALL_EVAL = ["data.max_eval_rows=10", "eval_before_training=false", "threads=1"]


def sweep_dir_from(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("Sweep folder:"))
    return Path(line.split(":", 1)[1].strip())


@pytest.mark.subprocess
def test_two_by_two_sweep_gives_four_runs_under_one_parent(tiny_models, tracking_uri, tmp_path):
    proc = run_train(["-m", *QUICK, "model=tiny_llama,tiny_phi", "orpo.beta=0.05,0.1",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 job(s) finished, 0 failed" in proc.stdout
    recorded = runs(tracking_uri)
    parents = [r for r in recorded if r.data.tags.get("orpolab.role") == "sweep"]
    children = [r for r in recorded if r.data.tags.get("orpolab.role") == "job"]
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id and c.info.status == "FINISHED" for c in children)
    combos = {(c.data.params["model.name_or_path"].rsplit("/", 1)[-1], c.data.params["orpo.beta"]) for c in children}
    assert combos == {("tiny_llama", "0.05"), ("tiny_llama", "0.1"), ("tiny_phi", "0.05"), ("tiny_phi", "0.1")}
    # Hydra's return value of each job is its best selection value, the same number MLflow holds.
    returns = [json.loads(line) for line in (tmp_path / "sweep" / "returns.jsonl").read_text().splitlines()]
    assert len(returns) == 4
    by_job = {c.data.tags["orpolab.job_num"]: c.data.metrics["best/val/chosen_bpb"] for c in children}
    for record in returns:
        assert record["status"] == "COMPLETED"
        assert abs(record["return_value"] - by_job[str(record["job"])]) < 1e-6
    # One folder per job with its checkpoints.
    assert all((tmp_path / "sweep" / str(i) / "checkpoints" / "last.ckpt").is_file() for i in range(4))


@pytest.mark.subprocess
def test_a_failing_job_does_not_stop_the_sweep_but_fails_its_exit_status(tiny_models, tracking_uri, tmp_path):
    # A data file that is missing when the job reads it (the settings themselves are checked before the
    # sweep starts, and a bad one stops it: tests/test_config.py).
    good = ROOT / "data" / "sample" / "train.jsonl"
    args = ["-m", *QUICK, *SMALL_EVAL, f"data.path=/nonexistent/train.jsonl,{good}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_train(args)
    # The job after the failed one ran, and the summary lists both ...
    assert "1 job(s) finished, 1 failed" in proc.stdout
    assert "data path /nonexistent/train.jsonl does not exist" in proc.stdout
    # ... but the command says the sweep did not succeed: which job, and the command that re-runs it.
    assert proc.returncode == 1, proc.stderr[-3000:]
    closing = proc.stderr.strip().splitlines()[-1]
    message, command = closing.split(" with: ")
    assert message == ("error: 1 of 2 jobs did not finish: job 0 (data.path=/nonexistent/train.jsonl); "
                       "re-run it (finished jobs are skipped)")
    assert shlex.split(command) == ["python", str(ROOT / "train.py"), *args]  # the same command resumes the sweep
    assert "Traceback" not in proc.stderr + proc.stdout
    children = job_runs(tracking_uri)
    status = {r.data.tags["orpolab.job_num"]: r.info.status for r in children}
    assert status == {"0": "FAILED", "1": "FINISHED"}
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "does not exist" in failed.data.tags["orpolab.error"]
    artifacts = [a.path for a in MlflowClient(tracking_uri).list_artifacts(failed.info.run_id)]
    assert "error.txt" in artifacts
    assert sweep_dir_from(proc.stdout) == (tmp_path / "sweep").resolve()
    # returns.jsonl says the same: the failed job as FAILED with its error, not COMPLETED without a value.
    returns = {r["job"]: r for r in map(json.loads, (tmp_path / "sweep" / "returns.jsonl").read_text().splitlines())}
    assert returns[0]["status"] == "FAILED" and returns[0]["return_value"] is None
    assert "does not exist" in returns[0]["error"]
    assert returns[1]["status"] == "COMPLETED" and returns[1]["return_value"] == pytest.approx(
        next(r for r in children if r.info.status == "FINISHED").data.metrics["best/val/chosen_bpb"])


@pytest.mark.subprocess
def test_unknown_config_name_stops_before_any_job(tiny_models, tracking_uri, tmp_path):
    proc = run_train(["-m", *QUICK, "model=tiny_llama,no_such_model", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode != 0
    assert "Could not find 'model/no_such_model'" in proc.stderr
    assert "tiny_llama" in proc.stderr  # Hydra lists the available options
    assert not (tmp_path / "sweep" / "0").exists()
    assert runs(tracking_uri) == []  # no empty parent run left behind


@pytest.mark.subprocess
def test_wrong_override_key_stops_before_any_job(tiny_models, tracking_uri, tmp_path):
    proc = run_train(["-m", *QUICK, "orpo.betta=0.1,0.2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode != 0
    assert "Could not override 'orpo.betta'" in proc.stderr
    assert not (tmp_path / "sweep" / "0").exists()


@pytest.mark.subprocess
def test_a_failing_export_fails_the_sweeps_exit_status(tiny_models, tracking_uri, tmp_path):
    # One job that trains fine, and a verification threshold no GGUF can meet (a perplexity at most half
    # the PyTorch model's): the export converts, verifies, fails, and the evaluation does not start.
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", *[o for o in QUICK if not o.startswith("export.")], *SMALL_EVAL, "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "export.quant_types=[]", "export.include_base=false",
                      "export.verify.num_texts=2", "export.verify.max_ppl_ratio.F16=0.5", "evaluation.enabled=false",
                      f"hydra.sweep.dir={sweep}"])
    assert "1 job(s) finished, 0 failed" in proc.stdout
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: the exported GGUF does not match the trained model" in proc.stderr  # the export's own line
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: Export failed (exit 1); rerun it with: python -m orpolab.export {sweep.resolve()}"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not json.loads((sweep / "export" / "export.json").read_text())["passed"]
    assert (sweep / "export" / "gguf" / "winner-f16.failed-verification.gguf").is_file()


def test_a_sweep_whose_jobs_export_and_evaluation_all_succeed_exits_0(sweep):
    assert sweep["returncode"] == 0
    assert "Sweep finished: 2 job(s) finished, 0 failed." in sweep["stdout"]
    assert "Exporting the winner" in sweep["stdout"] and "Evaluating winner vs base" in sweep["stdout"]
    assert "error:" not in sweep["stderr"] and "note:" not in sweep["stderr"]


class FakeSubmitit:
    """submitit's AutoExecutor as the sweep callback uses it: a local job runs here, a Slurm job never does."""

    def __init__(self, folder: str, cluster: str):
        self.cluster = cluster

    def update_parameters(self, **params) -> None:
        pass

    def submit(self, fn, *args):
        result = fn(*args) if self.cluster == "local" else None
        return SimpleNamespace(job_id="4242", result=lambda: result)


@pytest.mark.subprocess
def test_post_stages_on_a_cluster_count_when_waited_for_and_are_named_when_not(monkeypatch, tmp_path, capsys):
    from orpolab.sweep import callbacks

    monkeypatch.setitem(sys.modules, "submitit", SimpleNamespace(AutoExecutor=FakeSubmitit))
    # A stage that really fails: its module does not exist.
    stages = [("Export", "Exporting", "orpolab.no_such_stage", [], "rerun it with: python -m orpolab.export S")]
    launcher = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.{}Launcher"

    local = callbacks.SweepOutcome()
    config = OmegaConf.create({"hydra": {"launcher": {"_target_": launcher.format("Local")}}})
    callbacks.submit_post_stages(config, stages, str(tmp_path), local)
    assert local.failures == [f"Export failed (exit 1); rerun it with: python -m orpolab.export S (post-sweep job "
                              f"4242, logs in {tmp_path / '.submitit' / 'post'})"] and local.notes == []

    slurm = callbacks.SweepOutcome()
    config = OmegaConf.create({"hydra": {"launcher": {"_target_": launcher.format("Slurm")}}})
    callbacks.submit_post_stages(config, stages, str(tmp_path), slurm)
    assert slurm.failures == []  # not known when train.py exits: the note says so instead
    capsys.readouterr()
    slurm.report()
    assert capsys.readouterr().err.startswith("note: the exit status covers the training jobs only: export and "
                                              "evaluation run as Slurm job 4242 after this command ends")
