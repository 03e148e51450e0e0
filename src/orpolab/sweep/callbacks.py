"""Hydra callback that gives each multirun one MLflow parent run, a closing summary and its outcome.

A job's error is caught inside the job (recorded on its MLflow run) so that the other jobs run, the
post-sweep stages are subprocesses, and Hydra turns an exception raised in a callback into a
warning: none of them would change the exit status of ``python train.py -m``. The callback therefore
records what failed (:class:`SweepOutcome`), prints it with the commands that re-run it, and
``train.py`` exits with :func:`exit_status` once Hydra returns.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from orpolab.core import console, launcher, records, sweep_layout, tracking
from orpolab.core.files import append_jsonl
from orpolab.core.records import JobRecord, SweepRecord
from orpolab.sweep import preflight, sweep_id
from orpolab.train.trial import is_search

sweep_id.register()

log = logging.getLogger(__name__)
# A post-sweep stage that runs longer than this is stopped (a real 3.8B judge takes most of a minute per verdict).
STAGE_TIMEOUT_ENV, STAGE_TIMEOUT_S = "ORPOLAB_STAGE_TIMEOUT_S", 12 * 3600


def sweep_dir_of(config: DictConfig) -> str:
    return str(Path(config.hydra.sweep.dir).resolve())


@dataclass
class SweepOutcome:
    """What failed in this process's multirun: one line per failed job group or stage, each saying how
    to re-run it, and notes on what the exit status cannot cover (stages left running on a cluster).
    """

    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self) -> None:
        """The closing lines, on stderr after everything else (the report's path stays stdout's last line)."""
        for note in self.notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
        for failure in self.failures:
            print(f"error: {failure}", file=sys.stderr, flush=True)


# Set by the sweep callback when a multirun ends, read by train.py for its exit status.
_outcome: SweepOutcome | None = None


def job_outcome(config: DictConfig, job_return: Any) -> dict[str, Any]:
    """How a job of this sweep ended: ``COMPLETED`` with its best value, ``FAILED`` with its error, or
    ``PRUNED`` (a search trial its pruner stopped).

    A job catches its own error so that the sweep goes on, so Hydra calls it COMPLETED with no value;
    its MLflow run says whether it failed or was pruned.
    """
    status = getattr(job_return, "status", None)
    if status != JobStatus.COMPLETED:  # an error that escaped the job (Hydra holds it as the return value)
        error = getattr(job_return, "_return_value", None)
        return {"status": getattr(status, "name", str(status)), "return_value": None,
                "error": f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else ""}
    if job_return._return_value is not None:
        return {"status": "COMPLETED", "return_value": job_return._return_value}
    mlcfg = config.logger.mlflow
    sweep = tracking.sweep_run(mlcfg.tracking_uri, mlcfg.experiment_name, sweep_dir_of(config))
    job = tracking.job_record(mlcfg.tracking_uri, sweep.run_id, str(config.hydra.job.num)) if sweep else None
    if job is not None and job.pruned:
        return {"status": "PRUNED", "return_value": None}
    return {"status": "FAILED", "return_value": None,
            "error": job.error if job is not None and job.error else "the job returned no value"}


def exit_status() -> int:
    """1 if the multirun that ended in this process had a failed job or post-sweep stage, else 0.

    0 also when no multirun ran here (a single run exits by itself; ``--cfg`` or ``--help`` ran nothing).
    """
    return 1 if _outcome is not None and _outcome.failures else 0


def rerun_command() -> str:
    """The command that started this sweep: run again, it resumes the same sweep (finished jobs are skipped)."""
    return shlex.join(["python", *sys.argv])


class SweepCallback(Callback):
    """Creates the MLflow experiment before any job starts, and closes the sweep's parent run.

    Creating the experiment up front matters for parallel launchers: jobs then only look it up
    instead of racing each other to create it in SQLite. The parent run itself is created by the
    first job (``tracking.ensure_sweep_run``), so a sweep rejected by Hydra leaves nothing behind.
    """

    @console.exit_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        preflight.stop_unless_valid(config)  # every job's config, before any job or MLflow run exists
        folder = pin_sweep_dir(config)
        # A sweep folder of an older layout is refused before any of its jobs resumes.
        sweep_layout.check_sweep(folder, retry="start a new sweep with sweep_id=<a new name>")
        sweep_layout.stamp(folder, tracking.git_commit(str(config.paths.root_dir)))
        tracking.experiment_id(config.logger.mlflow.tracking_uri, config.logger.mlflow.experiment_name)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Append how the job ended and its best selection value to ``returns.jsonl`` (see :func:`job_outcome`)."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        record = {"job": config.hydra.job.num, "overrides": list(config.hydra.overrides.task),
                  **job_outcome(config, job_return)}
        append_jsonl(Path(sweep_dir_of(config)) / "returns.jsonl", record)

    @console.exit_on_error
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _outcome
        _outcome = outcome = SweepOutcome()
        try:
            self.finish_sweep(config, outcome)
        finally:
            outcome.report()

    def finish_sweep(self, config: DictConfig, outcome: SweepOutcome) -> None:
        """Summary, then export and evaluation; every failure goes into ``outcome``."""
        uri, name = config.logger.mlflow.tracking_uri, config.logger.mlflow.experiment_name
        sweep_dir = sweep_dir_of(config)
        summary = summarize_sweep(uri, name, sweep_dir)
        if summary is None:
            outcome.failures.append(f"no job of the sweep {sweep_dir} left a run in MLflow ({uri}); "
                                    f"run it again with: {rerun_command()}")
            return
        tracking.SweepRun(uri, summary.sweep.run_id).close(summary.jobs)
        print(format_summary(summary, uri, sweep_dir), flush=True)
        unfinished = [j for j in summary.jobs if not j.finished]
        if is_search(config.hydra.sweeper):
            # A search's pruned and failed trials are final outcomes, not failures of the command.
            if not summary.finished:
                outcome.failures.append(f"no trial of the search {sweep_dir} finished; see the trials' errors above")
        elif unfinished:
            outcome.failures.append(jobs_failure(unfinished, summary.jobs))
        if not config.export.enabled:
            return
        if not summary.finished:
            print("No job finished: nothing to export.", flush=True)
            return
        # This run's own export and evaluation overrides (the sweep may be re-run with other ones: same sweep).
        export_overrides, evaluation_overrides = stage_overrides(config)
        stages = [("Export", "Exporting the winner (merge, GGUF, quantize, verify)", "orpolab.export",
                   [sweep_dir, "--tracking-uri", uri, "--experiment", name, *export_overrides],
                   f"rerun it with: python -m orpolab.export {sweep_dir}")]
        if config.evaluation.enabled:
            stages.append(("Evaluation", "Evaluating winner vs base on the CPU (answers, judge, report)",
                           "orpolab.evaluate",
                           [sweep_dir, "--tracking-uri", uri, "--report-dir", str(config.paths.report_dir),
                            *evaluation_overrides],
                           f"it resumes where it stopped with: python -m orpolab.evaluate {sweep_dir}"))
        if launcher.submitit_cluster(config.hydra.launcher):
            submit_post_stages(config, stages, sweep_dir, outcome)
        elif launcher.is_ray(config.hydra.launcher):
            ray_post_stages(config, stages, outcome)
        else:
            failure = run_post_stages(stages)
            if failure:
                outcome.failures.append(failure)


def stage_overrides(config: DictConfig) -> tuple[list[str], list[str]]:
    """The command line's overrides of the export's and of the evaluation's settings, for their stages.

    They are not part of the sweep's identity, so a re-run with other ones finds the same sweep; the
    stages compose them onto the winner's recorded config (``orpolab.core.stage_config``).
    """
    from orpolab.core.stage_config import override_group

    task = [str(o) for o in config.hydra.overrides.task]
    return ([o for o in task if override_group(o) == "export"],
            [o for o in task if override_group(o) in ("evaluation", "eval_prompts")])


def jobs_failure(unfinished: list[JobRecord], jobs: list[JobRecord]) -> str:
    """One line for the jobs that did not finish (FAILED, or still RUNNING after a crash) and how to re-run them.

    Each job is named by the values the sweep varies, not by every override it shares with the others.
    """
    overrides = [console.brief_overrides(j.overrides).split() for j in jobs]
    shared = set.intersection(*map(set, overrides)) if len(jobs) > 1 else set()

    def name(job: JobRecord) -> str:
        own = [o for o in console.brief_overrides(job.overrides).split() if o not in shared]
        return f"{job.job_num} ({' '.join(own)})" if own else str(job.job_num)

    names = ", ".join(name(j) for j in unfinished[:3])
    more = f" and {len(unfinished) - 3} more" if len(unfinished) > 3 else ""
    one = len(unfinished) == 1
    return (f"{len(unfinished)} of {len(jobs)} jobs did not finish: {'job' if one else 'jobs'} {names}{more}; "
            f"re-run {'it' if one else 'them'} (finished jobs are skipped) with: {rerun_command()}")


def run_post_stages(stages: list[tuple], print_failure: bool = False) -> str | None:
    """Export, then evaluation (only if the export worked), each in its own process.

    Returns None when all ran, else the failed stage's line with the command that re-runs it.
    ``print_failure``: also print that line here, for a cluster job whose log nobody waits on.
    """
    for stage in stages:
        failure = run_stage(*stage)
        if failure:
            if print_failure:
                print(failure, flush=True)
            return failure
    return None


def submit_post_stages(config: DictConfig, stages: list[tuple], sweep_dir: str, outcome: SweepOutcome) -> None:
    """On a submitit launcher the heavy stages (merge, GGUF, judge) are a job of their own.

    Not the login node that submitted the sweep: the job gets the sweep's own resources (same
    partition, GPUs, memory, time limit). A local submitit sweep waits for it, and its outcome
    counts for the exit status; a Slurm one prints the job id and returns, so the exit status
    covers the training jobs only, which the closing note says.
    """
    import submitit

    launcher_cfg = config.hydra.launcher
    cluster = launcher.submitit_cluster(launcher_cfg)
    folder = Path(sweep_dir) / ".submitit" / "post"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {k: launcher_cfg[k] for k in ("timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb")
              if launcher_cfg.get(k) is not None}
    if cluster == "slurm":
        params.update({f"slurm_{k}": launcher_cfg[k] for k in ("partition", "qos", "account", "constraint", "gres",
                                                               "additional_parameters", "setup")
                       if launcher_cfg.get(k)})
    executor.update_parameters(name="orpolab-post-sweep", tasks_per_node=1, nodes=1, **params)
    job = executor.submit(run_post_stages, stages, True)
    print(f"\nPost-sweep stages (export, evaluation) submitted as {cluster} job {job.job_id}; "
          f"logs in {folder}", flush=True)
    if cluster == "local":
        failure = job.result()
        print(f"Post-sweep job {job.job_id} {'failed; see its logs' if failure else 'finished'}.", flush=True)
        if failure:
            outcome.failures.append(f"{failure} (post-sweep job {job.job_id}, logs in {folder})")
    else:
        outcome.notes.append(f"the exit status covers the training jobs only: export and evaluation run as Slurm "
                             f"job {job.job_id} after this command ends (its logs: {folder})")


def ray_post_stages(config: DictConfig, stages: list[tuple], outcome: SweepOutcome) -> None:
    """On a Ray cluster the heavy stages run as one Ray task with the jobs' resources (untested here).

    This process waits for the task, so its outcome counts for the exit status.
    """
    import ray

    ray_cfg = config.hydra.launcher.ray
    if not ray.is_initialized():
        ray.init(**OmegaConf.to_container(ray_cfg.init, resolve=True))
    remote = ray.remote(run_post_stages).options(**OmegaConf.to_container(ray_cfg.remote, resolve=True))
    print("\nPost-sweep stages (export, evaluation) submitted as a Ray task ...", flush=True)
    failure = ray.get(remote.remote(stages))
    print(f"Post-sweep task {'failed' if failure else 'finished'}.", flush=True)
    if failure:
        outcome.failures.append(f"{failure} (Ray task)")


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


def stage_env() -> dict[str, str]:
    """The environment of a post-sweep stage: this orpolab's source first on its path.

    ``train.py`` runs the orpolab of its own checkout; the stage, a new ``python -m orpolab...``, would
    import whichever orpolab is installed in the environment (another checkout's, or none) without it.
    """
    import orpolab

    src = str(Path(orpolab.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else "")}


def run_stage(name: str, title: str, module: str, args: list[str], retry_hint: str) -> str | None:
    """A post-sweep stage in its own process: the jobs' memory is freed and a crash stays contained.

    It stops after ``ORPOLAB_STAGE_TIMEOUT_S`` seconds (12 hours unless set), so a hung stage does not
    hold a cluster allocation forever. Returns None when it succeeded, else the line that says which
    stage failed and how to rerun it (the stage's own error line is already on the console).
    """
    timeout = float(os.environ.get(STAGE_TIMEOUT_ENV) or STAGE_TIMEOUT_S)
    print(f"\n{title} ...", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], timeout=timeout, env=stage_env())
    except subprocess.TimeoutExpired:
        return f"{name} timed out after {timeout:g} s ({STAGE_TIMEOUT_ENV}); {retry_hint}"
    if proc.returncode != 0:
        return f"{name} failed (exit {proc.returncode}); {retry_hint}"
    return None


@dataclass(frozen=True)
class SweepSummary:
    """A sweep's parent run and its jobs, as MLflow recorded them."""

    sweep: SweepRecord
    jobs: list[JobRecord]

    @property
    def finished(self) -> int:
        return sum(j.finished for j in self.jobs)

    @property
    def failed(self) -> int:
        return sum(j.status == records.FAILED for j in self.jobs)

    @property
    def pruned(self) -> int:
        """A search's trials its pruner stopped."""
        return sum(j.pruned for j in self.jobs)


def summarize_sweep(tracking_uri: str, experiment: str, sweep_dir: str) -> SweepSummary | None:
    """Status and selection value of every job of the sweep, from MLflow; None when no job left a run."""
    parent = tracking.sweep_run(tracking_uri, experiment, sweep_dir)
    if parent is None:
        return None
    return SweepSummary(parent, tracking.job_records(tracking_uri, parent.run_id))


def format_summary(summary: SweepSummary, tracking_uri: str, sweep_dir: str) -> str:
    pruned = f", {summary.pruned} pruned" if summary.pruned else ""
    lines = [f"\nSweep finished: {summary.finished} job(s) finished, {summary.failed} failed{pruned}."]
    for job in summary.jobs:
        value = f"{job.value:.4f}" if job.value is not None else "-"
        line = f"  job {job.job_num:>3}  {job.status:<9} best={value:<8} {console.brief_overrides(job.overrides)}"
        if job.error:
            line += f"\n             error: {job.error[:300]}"
        lines.append(line)
    lines.append(f"Sweep folder: {sweep_dir}")
    page = tracking.runs_page(summary.sweep.experiment_id)
    lines.append(f"MLflow UI:    mlflow ui --backend-store-uri {tracking_uri}   (then open {page})")
    return "\n".join(lines)

