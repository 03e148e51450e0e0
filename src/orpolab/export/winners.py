"""Pick a sweep's winner from MLflow: the finished job with the best selection value.

Rule (documented in README): among the sweep's child runs with status FINISHED that logged
``best/<metric>``, the best value wins (lowest for ``min``, highest for ``max``); ties, values
equal to 1e-12 relative, go to the lowest Hydra job number, then the earliest start. Failed
and unfinished jobs are ignored, and so are a search's pruned trials (KILLED) and its re-runs
of the best trial with other seeds (picking the luckiest seed would be the winner's curse again).
The winner's exported adapter is its *best* checkpoint, the one on which that value was measured,
never its last.

A sweep over several methods (``method=orpo,dpo,simpo,sft``) has one winner per method: the
selection metric is comparable across methods but favours some by construction (SFT minimises
exactly the chosen answers' NLL), so the methods are compared by the judge, not by it.
"""

from __future__ import annotations

import math
from pathlib import Path

from orpolab.core import records, tracking
from orpolab.core.errors import OrpolabError
from orpolab.core.records import JobRecord, SweepRecord


def sweep_parent(tracking_uri: str, experiment: str, sweep_dir: str | None = None,
                 parent_run_id: str | None = None) -> SweepRecord:
    """The parent run of a sweep, by folder or run id, with errors that say what was not found."""
    if parent_run_id:
        try:
            run = tracking.with_retry(lambda: tracking.client(tracking_uri).get_run(parent_run_id))
        except Exception as err:
            raise OrpolabError(f"MLflow run {parent_run_id} does not exist in {tracking_uri}") from err
        return SweepRecord.from_run(run)
    if sweep_dir is None:
        raise OrpolabError("give a sweep folder or an MLflow parent run id")
    folder = Path(sweep_dir).resolve()
    if not folder.is_dir():
        raise OrpolabError(f"sweep folder {folder} does not exist")
    parent = tracking.sweep_run(tracking_uri, experiment, str(folder))
    if parent is None:
        raise OrpolabError(f"no MLflow sweep run for {folder} in {tracking_uri} (experiment {experiment!r})")
    return parent


def rank(cands: list[JobRecord], mode: str) -> list[JobRecord]:
    """Finished runs with a finite value, best first, ties broken by job number then start time."""
    if mode not in ("min", "max"):
        raise OrpolabError(f"selection.mode must be 'min' or 'max', got {mode!r}")
    usable = [c for c in cands if c.finished and c.value is not None and math.isfinite(c.value)
              and c.confirm_of is None]
    sign = 1.0 if mode == "min" else -1.0
    # Round to 12 significant digits so float noise does not decide a tie.
    return sorted(usable, key=lambda c: (float(f"{sign * c.value:.12g}"), c.job_num, c.start_time))


def select_winners(tracking_uri: str, parent: SweepRecord, metric: str | None = None, mode: str | None = None,
                   log_to_parent: bool = True) -> dict[str, JobRecord]:
    """The winners by label: ``{"winner": ...}`` for a one-method sweep, else one per method name.

    The full ranking (per method) is logged on the parent run; errors if every job failed.
    ``metric`` and ``mode`` default to the ones the sweep's jobs were trained with (their tags):
    the best checkpoints were kept by that metric.
    """
    cands = tracking.job_records(tracking_uri, parent.run_id)
    metric = metric or next((c.metric for c in cands if c.metric), "")
    mode = mode or next((c.mode for c in cands if c.metric), "min")
    ranking = rank(cands, mode)
    if not ranking:
        failed = sum(c.status == records.FAILED for c in cands)
        raise OrpolabError(
            f"no finished job to export in sweep run {parent.run_id}: {len(cands)} job(s), {failed} failed. "
            "See the jobs' orpolab.error tags in MLflow; nothing was exported."
        )
    methods = sorted({c.method for c in cands}, key=lambda m: min(c.job_num for c in cands if c.method == m))
    per_method = {m: [c for c in ranking if c.method == m] for m in methods}
    if len(methods) == 1:
        winners = {"winner": ranking[0]}
    else:
        winners = {m: r[0] for m, r in per_method.items() if r}
        missing = [m for m, r in per_method.items() if not r]
        if missing:
            print(f"no finished job for method(s) {', '.join(missing)}: they are left out of the export", flush=True)
    for label, w in winners.items():
        if not w.best_checkpoint or not Path(w.best_checkpoint).is_file():
            raise OrpolabError(f"the {label}'s best checkpoint {w.best_checkpoint} is missing (job {w.job_num})")
    if log_to_parent:
        sweep_run = tracking.SweepRun(tracking_uri, parent.run_id)
        table = {"metric": metric, "mode": mode,
                 "rule": "best value per method; ties -> lowest job number, then earliest start",
                 "ranking": [c.brief() for c in ranking],
                 "per_method": {m: [c.job_num for c in r] for m, r in per_method.items()},
                 "ignored": [c.brief() for c in cands if c not in ranking]}
        sweep_run.log_dict(table, "selection/ranking.json")
        for label, w in winners.items():
            prefix = records.WINNER if label == "winner" else f"{records.WINNER}.{label}"
            sweep_run.set_tags({f"{prefix}_run_id": w.run_id, f"{prefix}_job": str(w.job_num),
                                f"{prefix}_overrides": w.overrides})
            key = f"winner/{metric}" if label == "winner" else f"winner/{label}/{metric}"
            sweep_run.log_metrics({key: w.value})
    return winners
