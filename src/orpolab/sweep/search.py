"""A Hydra sweeper that searches hyperparameters with Optuna's ask/tell API, resumably.

Optuna chooses the values and prunes; this sweeper does the bookkeeping that makes a search behave
like orpolab's grid sweeps:

- **One study per sweep**, in SQLite in the sweep folder (``optuna.db``) or an RDB URL
  (``hydra.sweeper.storage``), named by the sweep id: running the same command again loads it.
- **Job number = trial number.** Each trial is launched as the Hydra job with its trial's number,
  so its folder (``<sweep>/<number>``), its checkpoints and its MLflow child run are found again
  by that number, as a grid job's are. Renumbering on a re-run would hand a new trial an old one's
  result.
- **Continues up to ``n_trials`` in total.** Trials that ended (COMPLETE, PRUNED, FAIL) are final.
  A trial left RUNNING by a kill is launched again under its own number with its stored values:
  the job continues its MLflow run from its last checkpoint, and keeps reporting to the same
  Optuna trial (Optuna keeps a trial RUNNING until told otherwise, from any process, when no
  heartbeat is configured; none is, on purpose: a heartbeat would fail such trials and lose
  them). One command per study at a time: a lock file in the sweep folder refuses a second.
- **Outcome from the job**: its return value (the best selection value) is the objective; a job
  without one ended pruned (its MLflow run KILLED) or failed (FAILED), which Optuna is told, and
  the search goes on.
- **Confirmation**: ``confirm_seeds`` re-runs the best trial's values with other seeds, as
  enqueued trials marked ``confirm_of`` (not counted in ``n_trials``, never pruned, never the
  winner), and reports the spread of their values.

The summary, with every trial, is written to ``<sweep>/search.json``; the evaluation's report draws
the search from it and from the study.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from orpolab.core import console, records, tracking
from orpolab.core.errors import OrpolabError
from orpolab.core.files import write_json_atomic
from orpolab.core.launcher import parallel_jobs
from orpolab.core.records import JobRecord, SweepRecord
from orpolab.sweep import space as search_space
from orpolab.train.trial import study_location

log = logging.getLogger(__name__)
CONFIRM = "confirm_of"  # user attribute of a confirmation trial: the number of the trial it repeats
SUMMARY_FILE = "search.json"


class SearchSweeper(Sweeper):
    """Hydra sweeper over an Optuna study (see the module doc); ``conf/hydra/sweeper/orpolab_optuna.yaml``."""

    def __init__(self, n_trials: int = 8, params: Any = None, sampler: Any = None, pruner: Any = None,
                 storage: str | None = None, study_name: str | None = None, confirm_seeds: int = 0,
                 enqueue: Any = None):
        self.n_trials, self.params, self.confirm_seeds = int(n_trials), params, int(confirm_seeds)
        # Values to try first (Optuna's enqueue_trial), e.g. a known good setting: only into a new study.
        self.enqueue = [dict(OmegaConf.to_container(e, resolve=True) if isinstance(e, DictConfig) else e)
                        for e in (enqueue or [])]
        self.sampler, self.pruner = sampler, pruner
        self.storage, self.study_name = storage, study_name
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None
        self.storage_url = ""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    @console.exit_on_error
    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        from filelock import FileLock, Timeout

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's sweeper: the export reads it
        params = OmegaConf.to_container(self.params, resolve=True) if isinstance(self.params, DictConfig) \
            else self.params
        fixed, space = search_space.split(arguments, params)
        if "method" in space or "method.name" in space:
            raise OrpolabError("one method per search: the methods' parameters differ in name and scale, and the "
                               "selection metric favours SFT by construction; run one search per method")
        self.check_composes(fixed, space)
        lock = FileLock(str(sweep_dir / ".search.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout as err:
            raise OrpolabError(f"another command is running the search in {sweep_dir}; wait for it to end "
                               "(one command per study at a time)") from err
        try:
            study = self.load_study(sweep_dir)
            returns = self.run_study(study, fixed, space)
            summary = {**summarize(study, fixed, self.config), "storage": self.storage_url}
            write_json_atomic(sweep_dir / SUMMARY_FILE, summary)
            self.log_to_parent(summary)
            print(format_search(study), flush=True)
            return returns
        finally:
            lock.release()

    # ------------------------------------------------------------------ study

    def load_study(self, sweep_dir: Path):
        import optuna

        optuna.logging.disable_default_handler()  # Optuna's per-trial lines go to the log file
        optuna.logging.enable_propagation()
        url, name = study_location(self.storage, self.study_name, str(sweep_dir))
        self.storage_url = url
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}) \
            if url.startswith("sqlite") else url
        mode = str(self.config.selection.mode)
        direction = "minimize" if mode == "min" else "maximize"
        done = 0
        try:
            done = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
        except KeyError:  # a new study
            pass
        # pruner: null means no pruning (Optuna's own default would be a median pruner).
        study = optuna.create_study(storage=storage, study_name=name, direction=direction,
                                    sampler=build(self.sampler, seed_offset=done),
                                    pruner=build(self.pruner) or optuna.pruners.NopPruner(), load_if_exists=True)
        if study.direction.name.lower() != direction:
            raise OrpolabError(f"study {name!r} in {url} was created to {study.direction.name.lower()}, but "
                               f"selection.mode={mode} asks to {direction}; start a new search with sweep_id=<name>")
        study.set_user_attr("selection_metric", str(self.config.selection.metric))
        study.set_user_attr("command", shlex_join(["python", *sys.argv]))
        return study

    def check_composes(self, fixed: list[str], space: dict) -> None:
        """Compose and check trial configs at the ends of every range before any trial exists.

        A misspelt key, or a range that reaches an invalid value (a negative beta), stops the search
        here with the problem named, instead of failing trial after trial (orpolab.core.validate).
        """
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from orpolab.core.validate import problems_of

        base = {key: first_value(dist) for key, dist in space.items()}
        probes = [base] + [{**base, key: value} for key, dist in space.items() for value in ends(dist)[1:]]
        loader = self.hydra_context.config_loader
        for values in probes:
            overrides = fixed + [search_space.as_override(k, v) for k, v in values.items()]
            try:
                problems = problems_of(loader.load_sweep_config(self.config, overrides))
            except (HydraException, OmegaConfBaseException) as err:
                problems = [" ".join(str(err).split())]
            if problems:
                shown = " ".join(search_space.as_override(k, v) for k, v in values.items())
                raise OrpolabError(f"{'; '.join(problems)}, in the search's range ({shown})")

    def batch_size(self) -> int:
        """Trials launched together: the joblib launcher's ``n_jobs``, else one at a time."""
        return parallel_jobs(self.config.hydra.launcher)

    def run_study(self, study, fixed: list[str], space: dict) -> list[JobReturn]:
        from optuna.trial import TrialState

        returns: list[JobReturn] = []
        if self.enqueue and not study.get_trials(deepcopy=False):
            for values in self.enqueue:
                study.enqueue_trial(values)
        # Trials a kill left RUNNING: the same numbers and values, resumed from their checkpoints.
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if stale:
            print(f"Search: resuming {len(stale)} interrupted trial(s): "
                  f"{', '.join(str(t.number) for t in stale)}", flush=True)
        for group in contiguous(sorted(stale, key=lambda t: t.number)):
            returns += self.launch(study, group, fixed)
        while True:
            # Enqueued trials wait to be asked (ask() hands them out first); they count once they run.
            counted = [t for t in study.get_trials(deepcopy=False)
                       if CONFIRM not in t.user_attrs and t.state != TrialState.WAITING]
            left = self.n_trials - len(counted)
            if left <= 0:
                break
            asked = [study.ask(space) for _ in range(min(left, self.batch_size()))]
            returns += self.launch(study, asked, fixed)
        returns += self.confirm(study, fixed, space)
        return returns

    def confirm(self, study, fixed: list[str], space: dict) -> list[JobReturn]:
        """The best trial's values again with ``confirm_seeds`` other seeds (those not run yet)."""
        best = best_trial(study)
        if best is None or self.confirm_seeds <= 0:
            return []
        seed = int(self.config.seed)
        wanted = [seed + i for i in range(1, self.confirm_seeds + 1)]
        have = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get(CONFIRM) == best.number}
        todo = [s for s in wanted if s not in have]
        if not todo:
            return []
        print(f"Search: confirming trial {best.number} with seeds {', '.join(map(str, todo))}", flush=True)
        returns: list[JobReturn] = []
        for start in range(0, len(todo), self.batch_size()):
            asked = []
            for s in todo[start:start + self.batch_size()]:
                study.enqueue_trial(best.params, user_attrs={CONFIRM: best.number, "seed": s})
                asked.append(study.ask(space))
            returns += self.launch(study, asked, fixed)
        return returns

    # ------------------------------------------------------------------ trials

    def launch(self, study, trials: list, fixed: list[str]) -> list[JobReturn]:
        """Run trials of consecutive numbers as Hydra jobs of the same numbers; tell Optuna each outcome."""
        overrides = []
        for trial in trials:
            values = [search_space.as_override(k, v) for k, v in trial.params.items()]
            seed = trial.user_attrs.get("seed")
            shared = [o for o in fixed if not o.startswith("seed=")] if seed is not None else fixed
            overrides.append(shared + values + ([f"seed={seed}"] if seed is not None else []))
        returns = list(self.launcher.launch(overrides, initial_job_idx=trials[0].number))
        for trial, ret in zip(trials, returns, strict=True):
            self.tell(study, trial, ret)
        return returns

    def tell(self, study, trial, ret: JobReturn) -> None:
        """COMPLETE with the job's best selection value; PRUNED if its run was KILLED by the pruner; else FAIL."""
        import optuna
        from optuna.trial import TrialState

        value = ret._return_value if ret.status == JobStatus.COMPLETED else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            study.tell(trial.number, float(value), skip_if_finished=True)
            return
        job = self.job_record(trial.number)
        if job is not None and job.pruned:
            study.tell(trial.number, state=TrialState.PRUNED, skip_if_finished=True)
            return
        error = job.error if job is not None else ""
        if not error and ret.status == JobStatus.FAILED:
            error = f"{type(ret._return_value).__name__}: {ret._return_value}"
        if isinstance(trial, optuna.trial.FrozenTrial):  # a resumed trial: its live handle, to annotate it
            trial = optuna.trial.Trial(study, trial._trial_id)
        trial.set_user_attr("error", error[:500] or "the job returned no value")
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)

    def log_to_parent(self, summary: dict) -> None:
        """The search on the sweep's MLflow parent run: the study, its best trial, and search.json."""
        parent = self.sweep_record()
        if parent is None:  # no trial ran in this command nor before
            return
        run = tracking.SweepRun(self.config.logger.mlflow.tracking_uri, parent.run_id)
        run.log_dict(summary, f"search/{SUMMARY_FILE}")
        states = [t["state"] for t in summary["trials"] if t["confirm_of"] is None]
        run.log_metrics({f"search/trials_{s.lower()}": states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")})
        run.set_tags({records.STUDY: summary["study"], records.STUDY_STORAGE: summary["storage"]})
        best = summary["best"]
        if best is not None:
            run.set_tags({records.SEARCH_BEST_TRIAL: str(best["number"])})
            run.log_metrics({"search/best_value": best["value"]})
            if best["spread"]:
                spread = best["spread"]
                run.log_metrics({"search/confirm_mean": spread["mean"], "search/confirm_sd": spread["sd"]})

    def sweep_record(self) -> SweepRecord | None:
        """The search's MLflow parent run (created by its first trial), or None."""
        mlcfg = self.config.logger.mlflow
        sweep_dir = str(Path(str(self.config.hydra.sweep.dir)).resolve())
        return tracking.sweep_run(mlcfg.tracking_uri, mlcfg.experiment_name, sweep_dir)

    def job_record(self, number: int) -> JobRecord | None:
        """The trial's job record (by job number, under the sweep's parent run), or None."""
        parent = self.sweep_record()
        return tracking.job_record(self.config.logger.mlflow.tracking_uri, parent.run_id, str(number)) \
            if parent else None


def build(node: Any, seed_offset: int = 0) -> Any:
    """A sampler or pruner from its config (``_target_``), or as given.

    A seeded sampler of a study that already has trials gets its seed plus their number: rebuilt with
    the same seed in a new command, it would draw the same values again, and a resumed search would
    repeat its first trials. The seed still makes the whole search reproducible: it depends only on
    the command and the study's history.
    """
    from hydra.utils import instantiate

    if not isinstance(node, (DictConfig, dict)):
        return node
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if seed_offset and "seed" in values and values["seed"] is not None:  # the constructor's arguments, as given
        values["seed"] = int(values["seed"]) + seed_offset
    return instantiate(values)


def shlex_join(parts: list[str]) -> str:
    import shlex

    return shlex.join(parts)


def first_value(dist) -> Any:
    """A value inside a distribution, to compose a probe config with."""
    return dist.choices[0] if hasattr(dist, "choices") else dist.low


def ends(dist) -> list:
    """The values a range's checks try: its ends, or every choice (at most 10)."""
    return list(dist.choices[:10]) if hasattr(dist, "choices") else [dist.low, dist.high]


def contiguous(trials: list) -> list[list]:
    """Trials split into runs of consecutive numbers (a launcher numbers a batch's jobs consecutively)."""
    groups: list[list] = []
    for trial in trials:
        if groups and trial.number == groups[-1][-1].number + 1:
            groups[-1].append(trial)
        else:
            groups.append([trial])
    return groups


def best_trial(study):
    """The best COMPLETE trial of the search proper (confirmation runs excluded), or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if CONFIRM not in t.user_attrs]
    if not done:
        return None
    sign = 1.0 if study.direction.name == "MINIMIZE" else -1.0
    return min(done, key=lambda t: (sign * t.value, t.number))


def summarize(study, fixed: list[str], config: DictConfig) -> dict:
    """Every trial (number, state, value, values, pruned step, error), the best and its confirmation."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        trials.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                       "last_step": steps[-1] if steps else None, "confirm_of": t.user_attrs.get(CONFIRM),
                       "seed": t.user_attrs.get("seed"), "error": t.user_attrs.get("error")})
    best = best_trial(study)
    out: dict[str, Any] = {"study": study.study_name, "direction": study.direction.name.lower(),
                           "metric": str(config.selection.metric), "trials": trials, "best": None}
    if best is not None:
        values = [t.value for t in study.get_trials(deepcopy=False)
                  if t.user_attrs.get(CONFIRM) == best.number and t.value is not None]
        seeds = [best.value, *values]
        overrides = fixed + [search_space.as_override(k, v) for k, v in best.params.items()]
        out["best"] = {"number": best.number, "value": best.value, "params": best.params,
                       "command": shlex_join(["python", "train.py", *overrides]),
                       "confirm_values": values,
                       "spread": {"n": len(seeds), "mean": statistics.fmean(seeds),
                                  "sd": statistics.stdev(seeds) if len(seeds) > 1 else 0.0,
                                  "min": min(seeds), "max": max(seeds)} if values else None}
    return out


def format_search(study) -> str:
    """The closing lines of a search: how its trials ended and the best one."""
    from collections import Counter

    states = Counter(t.state.name for t in study.get_trials(deepcopy=False) if CONFIRM not in t.user_attrs)
    counts = ", ".join(f"{states.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
    lines = [f"\nSearch {study.study_name}: {sum(states.values())} trial(s): {counts}."]
    best = best_trial(study)
    if best is not None:
        values = " ".join(search_space.as_override(k, v) for k, v in best.params.items())
        lines.append(f"  best trial {best.number}: {best.value:.4f}  {values}")
        confirm = [t.value for t in study.get_trials(deepcopy=False)
                   if t.user_attrs.get(CONFIRM) == best.number and t.value is not None]
        if confirm:
            seeds = [best.value, *confirm]
            sd = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
            lines.append(f"  with {len(seeds)} seeds: mean {statistics.fmean(seeds):.4f}, sd {sd:.4f}, "
                         f"range {min(seeds):.4f}-{max(seeds):.4f}")
    return "\n".join(lines)
