"""One training job, top to bottom: where it runs -> its MLflow run -> the training -> how it ended.

``train.py`` at the project root is the Hydra entry point; its task function calls :func:`main`, which
runs :func:`run` and turns a single run's error into one sentence. :func:`run` is the job's steps:

1. :meth:`JobContext.of`: where the job writes and how it sits in a sweep;
2. :func:`earlier_attempt` and :func:`settled_outcome`: a job an earlier command of the same sweep
   finished (or a search trial that ended) is not run again;
3. :func:`start_job_run`, or :func:`continue_job_run` for an interrupted or failed attempt;
4. ``orpolab.train.fit.fit``: the training proper (data, model, trainer, result);
5. :func:`record_failure`: the error policy (a single run stops, a sweep goes on).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig

from orpolab.core import console, records, tracking
from orpolab.core.records import JobRecord
from orpolab.core.validate import validate
from orpolab.train.fit import fit
from orpolab.train.trial import TrialPruned, trial_of_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """Where a job writes and how it sits in a sweep (with Hydra's runtime, or without it in tests)."""

    output_dir: Path
    multirun: bool = False
    sweep_dir: str | None = None
    job_num: str = "0"
    overrides: str = ""
    parent_run_id: str | None = None  # the sweep's MLflow run

    @classmethod
    def of(cls, cfg: DictConfig, create_parent: bool = True) -> JobContext:
        """This job's context; in a sweep, ``create_parent`` finds or creates the sweep's MLflow run."""
        if not HydraConfig.initialized():
            return cls(output_dir=Path(cfg.paths.output_dir))
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        if hc.mode != RunMode.MULTIRUN:
            return cls(output_dir=Path(hc.runtime.output_dir), overrides=" ".join(overrides))
        sweep_dir = str(Path(hc.sweep.dir).resolve())
        mlcfg = cfg.logger.mlflow
        parent = tracking.ensure_sweep_run(mlcfg.tracking_uri, mlcfg.experiment_name, sweep_dir, overrides) \
            if create_parent else None
        return cls(output_dir=Path(hc.runtime.output_dir), multirun=True, sweep_dir=sweep_dir,
                   job_num=str(hc.job.num), overrides=" ".join(overrides), parent_run_id=parent)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def tags(self) -> dict[str, str]:
        """The tags that say which job this is, set on its MLflow run even when its config failed to resolve."""
        tags = {records.ROLE_TAG: records.JOB_ROLE, records.JOB_NUM: self.job_num, records.OVERRIDES: self.overrides,
                records.OUTPUT_DIR: str(self.output_dir.resolve())}
        if self.sweep_dir:
            tags[records.SWEEP_TAG] = self.sweep_dir
            tags[records.PARENT_TAG] = self.parent_run_id
        return tags


@dataclass(frozen=True)
class Settled:
    """The final outcome of an earlier attempt at a job: it is not run again, its value stands."""

    value: float | None


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run(cfg: DictConfig) -> float | None:
    """Train one job; returns its best selection value (None for a failed job inside a sweep)."""
    if not in_multirun():
        # A single run is checked here, before its MLflow run exists; a sweep checked every job's
        # config before its first job started (orpolab.sweep.preflight).
        validate(cfg)
    if global_rank() != 0:
        return fit(cfg, NullJob(), JobContext.of(cfg, create_parent=False).output_dir)
    ctx = JobContext.of(cfg)
    job: tracking.JobRun | None = None
    try:
        previous = earlier_attempt(cfg, ctx)
        settled = settled_outcome(previous, ctx) if previous is not None else None
        if settled is not None:
            return settled.value
        if previous is not None:
            job, resume = continue_job_run(cfg, ctx, previous)
        else:
            job, resume = start_job_run(cfg, ctx), None
        best = fit(cfg, job, ctx.output_dir, resume)
    except TrialPruned as pruned:  # the search's pruner stopped this trial: final, never resumed
        job.prune(pruned.step, pruned.value)
        log.info("trial %s %s", ctx.job_num, pruned, extra=console.SHOW)
        return None
    except Exception as err:
        record_failure(cfg, ctx, job, err)
        return None
    finally:
        release_memory()
    job.finish()
    return best


def earlier_attempt(cfg: DictConfig, ctx: JobContext) -> JobRecord | None:
    """The record of this job from an earlier command of the same sweep (by job number), or None."""
    if not ctx.multirun:
        return None
    return tracking.job_record(cfg.logger.mlflow.tracking_uri, ctx.parent_run_id, ctx.job_num)


def settled_outcome(previous: JobRecord, ctx: JobContext) -> Settled | None:
    """The earlier attempt's outcome when it is final: the job finished (its value), or it was a search
    trial that ended pruned or failed (a grid job's failure is retried); None when the job is to run."""
    done = finished_value(previous, ctx.output_dir)
    if done is not None:
        log.info("job %s finished in an earlier run of this sweep (%s); skipped", ctx.job_num, previous.run_id,
                 extra=console.SHOW)
        return Settled(done)
    if previous.status in (records.KILLED, records.FAILED) and trial_of_job() is not None:
        log.info("trial %s ended %s in an earlier run of this search; not re-run", ctx.job_num, previous.status,
                 extra=console.SHOW)
        return Settled(None)
    return None


def finished_value(previous: JobRecord, output_dir: Path) -> float | None:
    """The best value of a job that already finished (run FINISHED and its result.json written)."""
    result = output_dir / "result.json"
    if not previous.finished or not result.is_file():
        return None
    value = json.loads(result.read_text()).get("best_value")
    return float(value) if value is not None else None


def start_job_run(cfg: DictConfig, ctx: JobContext) -> tracking.JobRun:
    """The job's MLflow run (a child of the sweep's parent run), with params and tags."""
    mlcfg = cfg.logger.mlflow
    tags = {
        **ctx.tags(), records.MODEL: str(cfg.model.name_or_path), records.METHOD: str(cfg.method.name),
        records.SELECTION_METRIC: cfg.selection.metric, records.SELECTION_MODE: str(cfg.selection.mode),
        **tracking.reproducibility_tags(cfg.paths.root_dir),
    }
    name = f"job {ctx.job_num}: {ctx.overrides}" if ctx.multirun else cfg.task_name
    return tracking.JobRun.start(mlcfg.tracking_uri, mlcfg.experiment_name, name, tags, tracking.flatten(cfg))


def continue_job_run(cfg: DictConfig, ctx: JobContext, previous: JobRecord) -> tuple[tracking.JobRun, str | None]:
    """The MLflow run of an interrupted (killed, preempted) or failed attempt, RUNNING again, and the
    checkpoint the job continues from: its last one, when it has one."""
    job = tracking.JobRun(cfg.logger.mlflow.tracking_uri, previous.run_id)
    job.reopen()
    last = ctx.checkpoint_dir / "last.ckpt"
    resume = str(last) if last.is_file() else None
    count_attempt(job, previous, resume)
    log.info("job %s: resuming run %s from %s", ctx.job_num, job.run_id, resume or "the start", extra=console.SHOW)
    return job, resume


def count_attempt(job: tracking.JobRun, previous: JobRecord, resume: str | None) -> None:
    """Which attempt at the job this is and where it starts; the previous attempt's error is cleared."""
    job.set_tags({records.ATTEMPTS: str(previous.attempts + 1), records.RESUMED_FROM: resume or "start",
                  records.ERROR: ""})


def record_failure(cfg: DictConfig, ctx: JobContext, job: tracking.JobRun | None, err: Exception) -> None:
    """The error policy: the error goes on the job's MLflow run; a single run then raises it, a sweep goes
    on with its other jobs (the failure is in its closing summary)."""
    if job is None:  # the config itself failed to resolve: still leave a FAILED run behind
        mlcfg = cfg.logger.mlflow
        job = tracking.JobRun.start(mlcfg.tracking_uri, mlcfg.experiment_name, f"job {ctx.job_num}", ctx.tags(), {})
    job.fail(err)
    if not ctx.multirun:
        raise err
    log.error("job %s failed: %s: %s", ctx.job_num, type(err).__name__, err)


def release_memory() -> None:
    """Between jobs of the basic launcher (one process): free the finished job's model and its cache.

    ``malloc_trim`` hands the freed heap back to the OS on glibc, so the process's memory reflects
    what the next job needs rather than the high-water mark of all earlier ones.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def global_rank() -> int:
    """This process's rank in a multi-process job (0 when there is only one process).

    Lightning's DDP launcher starts ranks 1..N-1 by re-running the command with ``LOCAL_RANK``
    set; torchrun and Slurm set ``RANK``. Only rank 0 creates and writes the job's MLflow run.
    """
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class NullJob:
    """Stands in for the MLflow run on ranks other than 0, where Lightning's logger is silent too."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class JobLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that the run's end status is the job's to set, not Lightning's.

    Lightning finalizes its loggers at the end of every ``validate()`` and ``fit()``: the step-0
    evaluation would mark the run FINISHED before training starts, and a killed job would then
    look finished. ``run`` sets FINISHED or FAILED itself, once the job really ends.
    """

    def finalize(self, status: str = "success") -> None:
        pass  # log_model is off, so Lightning's finalize would only set the run's status


def main(cfg: DictConfig) -> float | None:
    """Hydra task function: a single run's errors become ``error: ...`` and exit 1 instead of a traceback.

    (In a sweep, ``run`` records a job's error on its MLflow run and the sweep goes on.) The traceback
    still goes to the job's log file; ``ORPOLAB_DEBUG=1`` lets it through to the console.
    """
    try:
        return run(cfg)
    except Exception as err:
        if console.debug():
            raise
        log.error("%s: %s", type(err).__name__, err, exc_info=True, extra=console.HIDE)
        print(console.error_line(err), file=sys.stderr, flush=True)
        sys.exit(1)
