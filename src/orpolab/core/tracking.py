"""MLflow bookkeeping: one parent run per sweep, one child run per job, failures recorded.

What the runs hold, and the names of their tags, is ``orpolab.core.records``; this module finds and
writes them in the store.

Jobs create their run through ``MlflowClient`` before any heavy work, so a job that fails while
loading its model still leaves a FAILED run that says why. Lightning's ``MLFlowLogger`` then logs
into that same run (``run_id=``). The tracking store defaults to a SQLite database: MLflow 3.13+
refuses the old ``./mlruns`` file store.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from orpolab.core import records
from orpolab.core.records import (
    EVALUATION_ROLE,
    PARENT_TAG,
    ROLE_TAG,
    RUN_NAME_TAG,
    SWEEP_TAG,
    JobRecord,
    SweepRecord,
    children_filter,
    sweep_filter,
)

log = logging.getLogger(__name__)

# MLflow 3's experiment kind (the UI's "Machine learning" type; its default view is the runs table).
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
PACKAGES = ("torch", "transformers", "peft", "lightning", "hydra-core", "mlflow", "datasets", "bitsandbytes")

T = TypeVar("T")


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def with_retry(fn: Callable[[], T], attempts: int = 8, delay: float = 0.25) -> T:
    """Retry on SQLite's "database is locked", which parallel writers can hit."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # MlflowException wraps sqlite3.OperationalError
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay * (2**attempt))
    raise AssertionError("unreachable")


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it if needed (tolerating a concurrent creator).

    It is marked as a model-training experiment, so MLflow's UI opens it on the runs table rather
    than on its GenAI overview (traces, prompts), which would show nothing of a sweep.
    """
    c = client(tracking_uri)
    exp = with_retry(lambda: c.get_experiment_by_name(name))
    if exp is not None:
        mark_training_experiment(c, exp)
        return exp.experiment_id
    try:
        return with_retry(lambda: c.create_experiment(name, artifact_location=artifact_location(tracking_uri),
                                                      tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}))
    except Exception:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def mark_training_experiment(c, exp) -> None:
    """Tag an experiment created before orpolab set its kind; a kind someone chose is left alone."""
    if EXPERIMENT_KIND_TAG not in exp.tags:
        with_retry(lambda: c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND))


def sweep_run(tracking_uri: str, experiment: str, sweep_dir: str) -> SweepRecord | None:
    """The parent run of the sweep whose output folder is ``sweep_dir`` (absolute), or None.

    The one lookup of a sweep's run by its folder: the summary, the export, a search and a job
    that resumes all find it here.
    """
    c = client(tracking_uri)
    exp = with_retry(lambda: c.get_experiment_by_name(experiment))
    if exp is None:
        return None
    runs = with_retry(lambda: c.search_runs([exp.experiment_id], filter_string=sweep_filter(sweep_dir),
                                            max_results=1, order_by=["attributes.start_time ASC"]))
    return SweepRecord.from_run(runs[0]) if runs else None


def ensure_sweep_run(tracking_uri: str, experiment: str, sweep_dir: str, overrides: list[str] | None = None) -> str:
    """The sweep's parent run id: found by its folder, or created by the first job that asks.

    Created lazily by a job, not when the sweep starts, so a sweep that Hydra rejects before any
    job runs (an unknown config name) leaves no empty run behind. A file lock in the sweep folder
    keeps parallel jobs from creating two parents.
    """
    from filelock import FileLock

    exp_id = experiment_id(tracking_uri, experiment)
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(sweep_dir) / ".mlflow-parent.lock")):
        found = sweep_run(tracking_uri, experiment, sweep_dir)
        if found is not None:
            if found.status != records.RUNNING:  # the sweep is being resumed
                SweepRun(tracking_uri, found.run_id).reopen()
            return found.run_id
        tags = {ROLE_TAG: records.SWEEP_ROLE, SWEEP_TAG: sweep_dir, RUN_NAME_TAG: f"sweep {Path(sweep_dir).name}"}
        if overrides:
            tags[records.SWEEP_OVERRIDES] = " ".join(overrides)[:5000]
        run = with_retry(lambda: client(tracking_uri).create_run(exp_id, tags=tags))
        return run.info.run_id


def child_runs(tracking_uri: str, parent_run_id: str, tags: dict[str, str] | None = None) -> list:
    """The MLflow runs of a sweep's jobs (nested under its parent run), oldest first, with ``tags``' values."""
    c = client(tracking_uri)
    parent = with_retry(lambda: c.get_run(parent_run_id))
    runs = with_retry(lambda: c.search_runs([parent.info.experiment_id], filter_string=children_filter(
        parent_run_id, tags), order_by=["attributes.start_time ASC"]))
    # The sweep's evaluations are nested runs of the same parent (evaluation_run): not jobs.
    return [r for r in runs if r.data.tags.get(ROLE_TAG) != EVALUATION_ROLE]


def job_records(tracking_uri: str, parent_run_id: str) -> list[JobRecord]:
    """Every job of a sweep as recorded, by job number (a job resumed keeps its run: one record per job)."""
    jobs = [JobRecord.from_run(r) for r in child_runs(tracking_uri, parent_run_id)]
    return sorted(jobs, key=lambda j: (j.job_num, j.start_time))


def job_record(tracking_uri: str, parent_run_id: str, job_num: str) -> JobRecord | None:
    """A sweep job's record from an earlier attempt at the same sweep (by job number), or None."""
    runs = child_runs(tracking_uri, parent_run_id, {records.JOB_NUM: job_num})
    return JobRecord.from_run(runs[0]) if runs else None


def evaluation_run(tracking_uri: str, parent_run_id: str, evaluation_id: str,
                   tags: dict[str, str]) -> EvaluationRun | None:
    """The nested run of one evaluation of a sweep (found by its id, else created), or None when the
    store has no such parent run: a sweep folder evaluated on another machine is evaluated locally."""
    c = client(tracking_uri)
    try:
        parent = with_retry(lambda: c.get_run(parent_run_id))
    except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST (another store), or no store at all
        return None
    query = children_filter(parent_run_id, {ROLE_TAG: EVALUATION_ROLE, records.EVALUATION_ID: evaluation_id})
    found = with_retry(lambda: c.search_runs([parent.info.experiment_id], filter_string=query, max_results=1))
    if found:
        run = EvaluationRun(tracking_uri, found[0].info.run_id)
        run.reopen()
    else:
        created = with_retry(lambda: c.create_run(parent.info.experiment_id, tags={
            PARENT_TAG: parent_run_id, ROLE_TAG: EVALUATION_ROLE, records.EVALUATION_ID: evaluation_id,
            RUN_NAME_TAG: f"evaluation {evaluation_id}", SWEEP_TAG: parent.data.tags.get(SWEEP_TAG, "")}))
        run = EvaluationRun(tracking_uri, created.info.run_id)
    run.set_tags(tags)
    return run


def flatten(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted keys (``orpo.beta``), the way overrides name them; enums as their names."""
    container = {k: OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True) if isinstance(cfg[k], DictConfig)
                 else cfg[k] for k in cfg if k != "hydra"}
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)[:6000]

    walk("", container)
    return flat


def git_commit(root: str) -> str:
    """The project's commit, with ``-dirty`` when the work tree differs from it."""
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def reproducibility_tags(root: str) -> dict[str, str]:
    tags = {records.GIT_COMMIT: git_commit(root), "python": platform.python_version()}
    for name in PACKAGES:
        try:
            tags[f"versions.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return tags


class TrackedRun:
    """A handle on one of orpolab's MLflow runs, to write into it (every call retried, see :func:`with_retry`)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = client(tracking_uri)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            with_retry(lambda k=key, v=value: self.client.set_tag(self.run_id, k, str(v)[:5000]))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        for key, value in metrics.items():
            with_retry(lambda k=key, v=value: self.client.log_metric(self.run_id, k, float(v), step=step))

    def log_dict(self, obj: dict, name: str) -> None:
        with_retry(lambda: self.client.log_dict(self.run_id, obj, name))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        with_retry(lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def finish(self) -> None:
        with_retry(lambda: self.client.set_terminated(self.run_id, records.FINISHED))

    def reopen(self) -> None:
        """Mark an interrupted, failed or finished run RUNNING again: a resumed command continues it."""
        with_retry(lambda: self.client.update_run(self.run_id, status=records.RUNNING))

    def fail(self, err: BaseException) -> None:
        """Mark FAILED with the error's one-line message as a tag and its traceback as an artifact."""
        message = f"{type(err).__name__}: {err}"
        try:
            self.set_tags({records.ERROR: message})
            text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            with_retry(lambda: self.client.log_text(self.run_id, text, "error.txt"))
        finally:
            with_retry(lambda: self.client.set_terminated(self.run_id, records.FAILED))


class SweepRun(TrackedRun):
    """The parent run of a sweep (role ``sweep``): the summary, the selection and a search log onto it."""

    def close(self, jobs: list[JobRecord]) -> None:
        """FINISHED, with how many of the sweep's jobs finished and failed."""
        self.log_metrics({"sweep/jobs_finished": sum(j.finished for j in jobs),
                          "sweep/jobs_failed": sum(j.status == records.FAILED for j in jobs)})
        self.finish()


class EvaluationRun(TrackedRun):
    """The run of one evaluation of a sweep (role ``evaluation``), nested under the sweep's run."""


class JobRun(TrackedRun):
    """The MLflow run of one training job (role ``job``), nested under its sweep's run in a multirun."""

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
              params: dict[str, str]) -> JobRun:
        exp_id = experiment_id(tracking_uri, experiment)
        c = client(tracking_uri)
        run = with_retry(lambda: c.create_run(exp_id, tags={RUN_NAME_TAG: run_name, **tags}))
        job = cls(tracking_uri, run.info.run_id)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps params per batch
            with_retry(lambda chunk=items[i: i + 100]: c.log_batch(job.run_id, params=chunk))
        return job

    def prune(self, step: int, value: float) -> None:
        """Mark a search trial that its pruner stopped: KILLED (never FINISHED, so it never wins), with the step."""
        self.set_tags({records.PRUNED_AT_STEP: str(step), records.PRUNED_VALUE: f"{value:.6g}"})
        with_retry(lambda: self.client.set_terminated(self.run_id, records.KILLED))


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database, not into ``./mlruns`` of the cwd."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides where its artifacts live


def default_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the project's SQLite database (as ``conf/logger/mlflow.yaml``)."""
    root = Path(os.environ.get("ORPOLAB_ROOT", Path.cwd()))
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def runs_page(experiment_id: str | None, host: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI address that opens an experiment on its runs table.

    MLflow 3's UI opens every experiment on its GenAI overview (traces, prompts: empty for a sweep)
    unless the address asks for the model-training view; the experiment-kind tag alone does not
    change that in 3.17.
    """
    page = f"#/experiments/{experiment_id}" if experiment_id else "#/experiments"
    return f"{host}/{page}?workflowType=machine_learning"


def print_runs_page(experiment: str = "orpolab") -> None:
    """``make mlflow-ui``: where to point the browser, for the project's store (before the server starts)."""
    exp = client(default_uri()).get_experiment_by_name(experiment)
    print(f"MLflow UI: open {runs_page(exp.experiment_id if exp else None)}", flush=True)
