"""Hydra callback that gives each multirun one MLflow parent run and a closing summary."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from orpolab.core import console, tracking
from orpolab.sweep import preflight, sweep_id

sweep_id.register()

log = logging.getLogger(__name__)
# A post-sweep stage that runs longer than this is stopped (a real 3.8B judge takes most of a minute per verdict).
STAGE_TIMEOUT_ENV, STAGE_TIMEOUT_S = "ORPOLAB_STAGE_TIMEOUT_S", 12 * 3600


def sweep_dir_of(config: DictConfig) -> str:
    return str(Path(config.hydra.sweep.dir).resolve())


class SweepCallback(Callback):
    """Creates the MLflow experiment before any job starts, and closes the sweep's parent run.

    Creating the experiment up front matters for parallel launchers: jobs then only look it up
    instead of racing each other to create it in SQLite. The parent run itself is created by the
    first job (``tracking.ensure_sweep_run``), so a sweep rejected by Hydra leaves nothing behind.
    """

    @console.exit_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        preflight.stop_unless_valid(config)  # every job's config, before any job or MLflow run exists
        pin_sweep_dir(config)
        tracking.experiment_id(config.logger.mlflow.tracking_uri, config.logger.mlflow.experiment_name)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Append the job's Hydra return value (its best selection value) to ``returns.jsonl``."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        status = getattr(job_return, "status", None)
        value = job_return._return_value if status == JobStatus.COMPLETED else None
        record = {"job": config.hydra.job.num, "overrides": list(config.hydra.overrides.task),
                  "status": getattr(status, "name", str(status)), "return_value": value}
        with open(Path(sweep_dir_of(config)) / "returns.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    @console.exit_on_error
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        uri, name = config.logger.mlflow.tracking_uri, config.logger.mlflow.experiment_name
        sweep_dir = sweep_dir_of(config)
        summary = summarize_sweep(uri, name, sweep_dir)
        if summary is None:
            return
        parent = tracking.JobRun(uri, summary["parent_run_id"])
        parent.log_metrics({"sweep/jobs_finished": summary["finished"], "sweep/jobs_failed": summary["failed"]})
        parent.finish()
        print(format_summary(summary, uri, sweep_dir), flush=True)
        if not (config.get("export") and config.export.enabled):
            return
        if not summary["finished"]:
            print("No job finished: nothing to export.", flush=True)
            return
        stages = [("Export", "Exporting the winner (merge, GGUF, quantize, verify)", "orpolab.export",
                   [sweep_dir, "--tracking-uri", uri, "--experiment", name],
                   f"rerun it with: python -m orpolab.export {sweep_dir}")]
        if config.get("evaluation") and config.evaluation.enabled:
            stages.append(("Evaluation", "Evaluating winner vs base on the CPU (answers, judge, report)",
                           "orpolab.evaluate",
                           [sweep_dir, "--tracking-uri", uri, "--report-dir", str(config.paths.report_dir)],
                           f"it resumes where it stopped with: python -m orpolab.evaluate {sweep_dir}"))
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if "submitit" in launcher:
            submit_post_stages(config, stages, sweep_dir)
        elif "RayLauncher" in launcher:
            ray_post_stages(config, stages)
        else:
            run_post_stages(stages)


def run_post_stages(stages: list[tuple]) -> bool:
    """Export, then evaluation (only if the export worked), each in its own process."""
    for stage in stages:
        if not run_stage(*stage):
            return False
    return True


def submit_post_stages(config: DictConfig, stages: list[tuple], sweep_dir: str) -> None:
    """On a submitit launcher the heavy stages (merge, GGUF, judge) are a job of their own.

    Not the login node that submitted the sweep: the job gets the sweep's own resources (same
    partition, GPUs, memory, time limit). A local submitit sweep waits for it; a Slurm one
    prints the job id and returns.
    """
    import submitit

    launcher = config.hydra.launcher
    cluster = "local" if "LocalLauncher" in str(launcher._target_) else "slurm"
    folder = Path(sweep_dir) / ".submitit" / "post"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {k: launcher[k] for k in ("timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb")
              if launcher.get(k) is not None}
    if cluster == "slurm":
        params.update({f"slurm_{k}": launcher[k] for k in ("partition", "qos", "account", "constraint", "gres",
                                                           "additional_parameters", "setup")
                       if launcher.get(k)})
    executor.update_parameters(name="orpolab-post-sweep", tasks_per_node=1, nodes=1, **params)
    job = executor.submit(run_post_stages, stages)
    print(f"\nPost-sweep stages (export, evaluation) submitted as {cluster} job {job.job_id}; "
          f"logs in {folder}", flush=True)
    if cluster == "local":
        ok = job.result()
        print(f"Post-sweep job {job.job_id} {'finished' if ok else 'failed; see its logs'}.", flush=True)


def ray_post_stages(config: DictConfig, stages: list[tuple]) -> None:
    """On a Ray cluster the heavy stages run as one Ray task with the jobs' resources (untested here)."""
    import ray

    ray_cfg = config.hydra.launcher.ray
    if not ray.is_initialized():
        ray.init(**OmegaConf.to_container(ray_cfg.init, resolve=True))
    remote = ray.remote(run_post_stages).options(**OmegaConf.to_container(ray_cfg.remote, resolve=True))
    print("\nPost-sweep stages (export, evaluation) submitted as a Ray task ...", flush=True)
    ok = ray.get(remote.remote(stages))
    print(f"Post-sweep task {'finished' if ok else 'failed'}.", flush=True)


def pin_sweep_dir(config: DictConfig) -> str:
    """Resolve the sweep folder once, in the process that starts the sweep, and hand it to every job.

    The folder's name is derived from the sweep's own overrides (``orpolab.sweep_id``); a job's
    config holds only its own overrides, so it must not derive it again. Hydra builds each job's
    config from ``hydra.overrides.hydra`` plus the job's overrides, so the resolved folder goes there.
    """
    folder = str(Path(str(config.hydra.sweep.dir)).resolve())
    with read_write(config.hydra.sweep), open_dict(config.hydra.sweep):
        config.hydra.sweep.dir = folder
    with read_write(config.hydra.overrides.hydra):
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{folder}'")
    return folder


def run_stage(name: str, title: str, module: str, args: list[str], retry_hint: str) -> bool:
    """A post-sweep stage in its own process: the jobs' memory is freed and a crash stays contained.

    It stops after ``ORPOLAB_STAGE_TIMEOUT_S`` seconds (12 hours unless set), so a hung stage does not
    hold a cluster allocation forever; either way the line says which stage and how to rerun it.
    """
    timeout = float(os.environ.get(STAGE_TIMEOUT_ENV) or STAGE_TIMEOUT_S)
    print(f"\n{title} ...", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name} timed out after {timeout:g} s ({STAGE_TIMEOUT_ENV}); {retry_hint}", flush=True)
        return False
    if proc.returncode != 0:
        print(f"{name} failed (exit {proc.returncode}); {retry_hint}", flush=True)
    return proc.returncode == 0


def summarize_sweep(tracking_uri: str, experiment: str, sweep_dir: str) -> dict | None:
    """Status and selection value of every job of the sweep, from MLflow."""
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    parent = tracking.find_sweep_run(tracking_uri, exp.experiment_id, sweep_dir)
    if parent is None:
        return None
    children = tracking.child_runs(tracking_uri, parent.info.run_id)
    jobs = []
    for run in sorted(children, key=lambda r: int(r.data.tags.get("orpolab.job_num", "0"))):
        metric = run.data.tags.get("orpolab.selection_metric", "")
        jobs.append({
            "job": run.data.tags.get("orpolab.job_num", "?"),
            "overrides": run.data.tags.get("orpolab.overrides", ""),
            "status": run.info.status,
            "best": run.data.metrics.get(f"best/{metric}"),
            "error": run.data.tags.get("orpolab.error", ""),
            "run_id": run.info.run_id,
        })
    return {
        "parent_run_id": parent.info.run_id, "experiment_id": exp.experiment_id, "jobs": jobs,
        "finished": sum(j["status"] == "FINISHED" for j in jobs),
        "failed": sum(j["status"] == "FAILED" for j in jobs),
    }


def format_summary(summary: dict, tracking_uri: str, sweep_dir: str) -> str:
    lines = [f"\nSweep finished: {summary['finished']} job(s) finished, {summary['failed']} failed."]
    for job in summary["jobs"]:
        value = f"{job['best']:.4f}" if job["best"] is not None else "-"
        line = f"  job {job['job']:>3}  {job['status']:<9} best={value:<8} {console.brief_overrides(job['overrides'])}"
        if job["error"]:
            line += f"\n             error: {job['error'][:300]}"
        lines.append(line)
    lines.append(f"Sweep folder: {sweep_dir}")
    page = tracking.runs_page(summary.get("experiment_id"))
    lines.append(f"MLflow UI:    mlflow ui --backend-store-uri {tracking_uri}   (then open {page})")
    return "\n".join(lines)

