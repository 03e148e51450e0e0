"""The MLflow record of a sweep and its jobs, read back through one lookup (orpolab.core.records, tracking)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from orpolab.core import records, tracking


def test_a_sweeps_jobs_read_back_as_records_and_evaluation_runs_are_not_jobs(tracking_uri, tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    assert tracking.sweep_run(tracking_uri, "orpolab", sweep_dir) is None  # no experiment yet: nothing, no error
    parent_id = tracking.ensure_sweep_run(tracking_uri, "orpolab", sweep_dir, ["orpo.beta=0.05,0.1"])
    exp = tracking.experiment_id(tracking_uri, "orpolab")
    c = MlflowClient(tracking_uri)
    for num, status, value in [(1, "FAILED", None), (0, "FINISHED", 0.75)]:
        run = c.create_run(exp, tags={records.PARENT_TAG: parent_id, records.ROLE_TAG: records.JOB_ROLE,
                                      records.JOB_NUM: str(num), records.OVERRIDES: f"orpo.beta={num}",
                                      records.SELECTION_METRIC: "val/chosen_bpb", records.METHOD: "dpo",
                                      **({records.ERROR: "ValueError: bad"} if status == "FAILED" else {})})
        c.log_param(run.info.run_id, "orpo.beta", str(num))
        if value is not None:
            c.log_metric(run.info.run_id, records.best_metric("val/chosen_bpb"), value)
        c.set_terminated(run.info.run_id, status)
    tracking.evaluation_run(tracking_uri, parent_id, "ev1", {records.JUDGE: "flow-judge"})

    sweep = tracking.sweep_run(tracking_uri, "orpolab", sweep_dir)
    assert (sweep.run_id, sweep.sweep_dir, sweep.experiment_id) == (parent_id, sweep_dir, exp)
    jobs = tracking.job_records(tracking_uri, parent_id)
    assert [(j.job_num, j.status, j.value, j.error) for j in jobs] == [
        (0, "FINISHED", 0.75, ""), (1, "FAILED", None, "ValueError: bad")]
    assert jobs[0].finished and not jobs[1].finished and jobs[0].method == "dpo"
    assert jobs[0].params == {"orpo.beta": "0"} and jobs[0].overrides == "orpo.beta=0"
    assert "params" not in jobs[0].brief() and jobs[0].brief()["value"] == 0.75
    assert tracking.job_record(tracking_uri, parent_id, "1").error == "ValueError: bad"
    assert tracking.job_record(tracking_uri, parent_id, "7") is None
    # The same folder finds the same run again, now RUNNING for a resumed sweep.
    tracking.SweepRun(tracking_uri, parent_id).close(jobs)
    assert tracking.ensure_sweep_run(tracking_uri, "orpolab", sweep_dir) == parent_id
    parent = c.get_run(parent_id)
    assert parent.info.status == "RUNNING" and parent.data.metrics["sweep/jobs_failed"] == 1
    assert parent.data.tags[records.SWEEP_OVERRIDES] == "orpo.beta=0.05,0.1"
