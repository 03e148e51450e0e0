"""A sweep on a real (single-node) Slurm cluster through submitit: a preempted job is requeued and resumes
from its checkpoint into the same MLflow run with the same losses; export and evaluation run as a Slurm job."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from ..helpers import compose, job_runs, losses
from .helpers import STEPS, SWEEP, start_sweep, stop_group, wait_until

# What fits this node (2 CPUs, no GPU) instead of the preset's GPU, 8 CPUs and 64 GB.
ON_THIS_NODE = ["hydra/launcher=slurm", "hydra.launcher.partition=local", "hydra.launcher.gpus_per_node=null",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20"]


def slurm_cmd(env: dict[str, str], *args: str) -> str:
    return subprocess.run(list(args), env={**os.environ, **env}, check=True, capture_output=True, text=True,
                          timeout=30).stdout


def job_state(env: dict[str, str], job_id: str) -> str:
    """A job's state as slurmctld reports it (finished jobs stay listed for MinJobAge)."""
    out = slurm_cmd(env, "scontrol", "-o", "show", "job", job_id)
    return re.search(r"JobState=(\S+)", out).group(1)


def test_preempted_slurm_job_resumes_into_its_run_and_post_stages_are_a_slurm_job(
        slurm, warm_llama, tracking_uri, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [*SWEEP, *ON_THIS_NODE, f"hydra.sweep.dir={sweep_dir}", f"paths.report_dir={tmp_path / 'report'}",
            f"evaluation.judge.calibration_cache={tmp_path / 'calibration'}"]
    log = tmp_path / "sweep.log"
    proc = start_sweep(args, log, slurm)
    try:
        # Preempted the way a cluster does it for submitit (USR2), once job 1 has a checkpoint to resume from.
        wait_until(lambda: (sweep_dir / "1" / "checkpoints" / "last.ckpt").is_file() or proc.poll() is not None,
                   600, "job 1's first checkpoint")
        assert proc.poll() is None, log.read_text()[-3000:]
        queue = slurm_cmd(slurm, "squeue", "-h", "-r", "-o", "%i %T").split("\n")
        job1 = next(line.split()[0] for line in queue if line.split() and line.split()[0].endswith("_1"))
        slurm_cmd(slurm, "scancel", "--signal=USR2", job1)
        proc.wait(timeout=1200)
    finally:
        stop_group(proc)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "2 job(s) finished, 0 failed" in out

    # submitit caught the signal, checkpointed its call and requeued the job: one Slurm job, two attempts.
    job1_log = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob(f"{job1}/*_log.err"))
    assert "Caught signal SIGUSR2" in job1_log and "this job is preempted" in job1_log, job1_log[-3000:]
    assert re.search(r"JOB \d+ ON localhost CANCELLED AT \S+ DUE TO JOB REQUEUE", job1_log)
    runs = {r.data.tags["orpolab.job_num"]: r for r in job_runs(tracking_uri)}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["0"].data.tags.get("orpolab.attempts") is None
    assert runs["1"].data.tags["orpolab.attempts"] == "2"  # the same MLflow run, continued
    assert runs["1"].data.tags["orpolab.resumed_from"] == str(sweep_dir / "1" / "checkpoints" / "last.ckpt")
    resumed = losses(tracking_uri, runs["1"].info.run_id)
    assert sorted(resumed) == list(range(STEPS))

    # The same job uninterrupted, here (same seed, config and thread count): the same loss at every step.
    from orpolab.train.job import run

    job_overrides = [a for a in SWEEP if a not in ("-m", "orpo.beta=0.05,0.1")]
    run(compose([*job_overrides, "orpo.beta=0.1", "export.enabled=false"], tmp_path / "reference"))
    single = next(r for r in job_runs(tracking_uri) if "mlflow.parentRunId" not in r.data.tags)
    reference = losses(tracking_uri, single.info.run_id)
    for step in range(STEPS):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step

    # Export and evaluation: a Slurm job of their own, submitted when the sweep ended.
    post = re.search(r"submitted as slurm job (\d+)", out).group(1)
    assert f"export and evaluation run as Slurm job {post}" in out
    wait_until(lambda: job_state(slurm, post) not in ("PENDING", "RUNNING", "COMPLETING"), 900,
               f"post-sweep Slurm job {post}", interval=2)
    post_log = "".join(p.read_text() for p in (sweep_dir / ".submitit" / "post").glob("*_log.out"))
    assert job_state(slurm, post) == "COMPLETED", post_log[-3000:]
    assert "verification (GGUF vs merged PyTorch model" in post_log
    assert json.loads((sweep_dir / "export" / "export.json").read_text())["passed"]
    reports = sorted((tmp_path / "report" / "sweep").glob("*/report.md"))  # one folder per evaluation
    assert len(reports) == 1 and (tmp_path / "report" / "latest" / "report.md").resolve() == reports[0].resolve()
