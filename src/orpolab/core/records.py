"""What orpolab records in MLflow about a sweep and its jobs: the tag names, and the records read back.

Three kinds of run carry orpolab's tags, told apart by :data:`ROLE_TAG`:

- the **sweep run** (role ``sweep``): one per sweep folder, the parent of the others; the export's
  winners, the selection's ranking and a search's study are logged on it;
- a **job run** (role ``job``): one per Hydra job, a child of the sweep run in a multirun; its
  status, selection value and checkpoints are what the summary, the winner's selection and the
  report read, through :class:`JobRecord`;
- an **evaluation run** (role ``evaluation``): one per evaluation of a sweep, also a child of the
  sweep run (so it is never counted as a job).

This module only names and reads; ``orpolab.core.tracking`` talks to the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# MLflow's own tags.
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"

# Which run is which, and the sweep it belongs to (every kind of run).
ROLE_TAG = "orpolab.role"
SWEEP_ROLE, JOB_ROLE, EVALUATION_ROLE = "sweep", "job", "evaluation"
SWEEP_TAG = "orpolab.sweep_dir"

# The sweep run.
SWEEP_OVERRIDES = "orpolab.sweep_overrides"
WINNER = "orpolab.winner"  # {WINNER}_run_id, ..._job, ..._overrides; per method: {WINNER}.<method>_run_id
STUDY, STUDY_STORAGE, SEARCH_BEST_TRIAL = "orpolab.study", "orpolab.study_storage", "orpolab.search_best_trial"
EXPORT_DIR, MERGED_MODEL, EXPORT_PASSED = "orpolab.export_dir", "orpolab.merged_model", "orpolab.export_passed"

# A job run.
JOB_NUM = "orpolab.job_num"
OVERRIDES = "orpolab.overrides"
OUTPUT_DIR = "orpolab.output_dir"
MODEL, METHOD = "orpolab.model", "orpolab.method"
SELECTION_METRIC, SELECTION_MODE = "orpolab.selection_metric", "orpolab.selection_mode"
BEST_CHECKPOINT = "orpolab.best_checkpoint"
ERROR = "orpolab.error"  # "Type: message" of the last failure; emptied when the job is resumed
ATTEMPTS, RESUMED_FROM = "orpolab.attempts", "orpolab.resumed_from"
PRUNED_AT_STEP, PRUNED_VALUE = "orpolab.pruned_at_step", "orpolab.pruned_value"
DATA_HASH, TORCH_THREADS, WORLD_SIZE = "orpolab.data_hash", "orpolab.torch_threads", "orpolab.world_size"
GIT_COMMIT = "orpolab.git_commit"
# A trial of a search: its number, study and values (SEARCH_PARAM + name), and for a re-run of the
# best trial with another seed, that trial's number.
TRIAL, SEARCH_PARAM, CONFIRM_OF = "orpolab.trial", "orpolab.search.", "orpolab.confirm_of"

# An evaluation run: its id (its folder's name), the judge (name and GGUF), the prompt set, its folder.
EVALUATION_ID, EVALUATION_DIR = "orpolab.evaluation_id", "orpolab.evaluation_dir"
JUDGE, JUDGE_PATH, EVAL_PROMPTS = "orpolab.judge", "orpolab.judge_path", "orpolab.eval_prompts"

# MLflow's end states as orpolab uses them: KILLED is a search trial its pruner stopped.
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"


def best_metric(metric: str) -> str:
    """The metric a job logs its best selection value under (``best/val/chosen_bpb``)."""
    return f"best/{metric}"


@dataclass(frozen=True)
class JobRecord:
    """One job of a sweep as its MLflow run records it.

    ``value`` is the best selection value the job logged (None until it logged one); ``output_dir``
    and ``best_checkpoint`` are the paths on the machine that trained it. ``params`` and ``metrics``
    are the run's latest values, for readers that need more than the selection (the report's table).
    """

    run_id: str
    job_num: int
    status: str
    value: float | None
    overrides: str = ""
    metric: str = ""
    mode: str = "min"
    method: str = "orpo"
    output_dir: str | None = None
    best_checkpoint: str | None = None
    error: str = ""
    confirm_of: str | None = None
    attempts: int = 1
    start_time: int = 0
    params: dict[str, str] = field(default_factory=dict, repr=False)
    metrics: dict[str, float] = field(default_factory=dict, repr=False)

    @classmethod
    def from_run(cls, run: Any) -> JobRecord:
        """From an ``mlflow.entities.Run`` of role ``job`` (defaults for tags a failed start left unset)."""
        tags = run.data.tags
        metric = tags.get(SELECTION_METRIC, "")
        return cls(
            run_id=run.info.run_id, job_num=int(tags.get(JOB_NUM, "0")), status=run.info.status,
            overrides=tags.get(OVERRIDES, ""), metric=metric, mode=tags.get(SELECTION_MODE, "min"),
            value=run.data.metrics.get(best_metric(metric)) if metric else None,
            method=tags.get(METHOD, "orpo"), output_dir=tags.get(OUTPUT_DIR), best_checkpoint=tags.get(BEST_CHECKPOINT),
            error=tags.get(ERROR, ""), confirm_of=tags.get(CONFIRM_OF) or None,
            attempts=int(tags.get(ATTEMPTS, "1")), start_time=run.info.start_time or 0,
            params=dict(run.data.params), metrics=dict(run.data.metrics),
        )

    def brief(self) -> dict[str, Any]:
        """The record without the run's params and metrics (a row of the selection's ranking)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("params", "metrics")}

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def pruned(self) -> bool:
        """A search trial its pruner stopped (final: never resumed, never a winner)."""
        return self.status == KILLED


@dataclass(frozen=True)
class SweepRecord:
    """A sweep's parent run: its id, experiment and the folder of the sweep it stands for."""

    run_id: str
    experiment_id: str
    sweep_dir: str
    status: str

    @classmethod
    def from_run(cls, run: Any) -> SweepRecord:
        return cls(run_id=run.info.run_id, experiment_id=run.info.experiment_id,
                   sweep_dir=run.data.tags.get(SWEEP_TAG, ""), status=run.info.status)


def sweep_filter(sweep_dir: str) -> str:
    """MLflow's search filter for the parent run of the sweep in ``sweep_dir`` (an absolute path)."""
    return f"tags.`{ROLE_TAG}` = '{SWEEP_ROLE}' and tags.`{SWEEP_TAG}` = '{sweep_dir}'"


def children_filter(parent_run_id: str, tags: dict[str, str] | None = None) -> str:
    """MLflow's search filter for the runs nested under a sweep run, with the given tag values."""
    conditions = [f"tags.`{key}` = '{value}'" for key, value in {PARENT_TAG: parent_run_id, **(tags or {})}.items()]
    return " and ".join(conditions)
