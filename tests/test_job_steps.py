"""A sweep job's steps before training: what an earlier attempt settled, and reopening its run to resume it."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from orpolab.core import records, tracking
from orpolab.train import job


def test_an_earlier_attempt_is_skipped_when_finished_and_continued_otherwise(tracking_uri, tmp_path):
    parent = tracking.ensure_sweep_run(tracking_uri, "orpolab", str(tmp_path / "sweep"))
    ctx = job.JobContext(output_dir=tmp_path / "sweep" / "1", multirun=True, sweep_dir=str(tmp_path / "sweep"),
                         job_num="1", overrides="orpo.beta=0.1", parent_run_id=parent)
    cfg = OmegaConf.create({"logger": {"mlflow": {"tracking_uri": tracking_uri, "experiment_name": "orpolab"}}})
    assert job.earlier_attempt(cfg, ctx) is None  # a first attempt: nothing to settle or resume

    first = tracking.JobRun.start(tracking_uri, "orpolab", "job 1", ctx.tags(), {})
    first.fail(ValueError("disk full"))
    previous = job.earlier_attempt(cfg, ctx)
    assert previous.run_id == first.run_id and previous.error == "ValueError: disk full"
    assert job.settled_outcome(previous, ctx) is None  # a grid job's failure is retried

    ctx.checkpoint_dir.mkdir(parents=True)
    (ctx.checkpoint_dir / "last.ckpt").write_bytes(b"x")
    run, resume = job.continue_job_run(cfg, ctx, previous)
    assert run.run_id == first.run_id and resume == str(ctx.checkpoint_dir / "last.ckpt")
    reopened = MlflowClient(tracking_uri).get_run(first.run_id)
    assert reopened.info.status == "RUNNING"
    assert reopened.data.tags[records.ATTEMPTS] == "2" and reopened.data.tags[records.RESUMED_FROM] == resume
    assert reopened.data.tags[records.ERROR] == ""  # the previous attempt's error no longer stands

    run.finish()
    (ctx.output_dir / "result.json").write_text(json.dumps({"best_value": 0.25}))
    assert job.settled_outcome(job.earlier_attempt(cfg, ctx), ctx) == job.Settled(0.25)
